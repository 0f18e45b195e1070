"""Policy, value and reward networks: the shared trunk plus a small head.

  PolicyModel   logits over the vocabulary at every position
  ValueModel    a scalar per position (PPO's critic)
  RewardModel   a scalar per sequence, read at its last real token (the EOS)

The value and reward networks have identical parameter trees (trunk, `head`, `gain`,
`bias`), so PPO initialises its critic from the reward model by copying params
(Stiennon et al. 2020; Ouyang et al. 2022). `gain` and `bias` are the reward
normalisation of Ziegler et al. 2019: after RM training `bias` is set so reference
responses score mean 0, which keeps the KL coefficient meaningful across RMs.

All models take `tokens` [B, T] and `mask` [B, T] (1 = real token); positions come
from the mask, so left-padded prompts need no special handling. Outputs are float32.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from rlhf_jax.models.transformer import (Cache, Transformer, TransformerConfig,
                                         as_token_rows, positions_from_mask)
from rlhf_jax.sharding import constrain


def _positions(mask, positions):
  return positions_from_mask(mask) if positions is None else positions


class PolicyModel(nn.Module):
  """Trunk + LM head. With `cache`, returns (logits, new_cache) for decoding."""
  config: TransformerConfig

  def setup(self):
    c = self.config
    self.trunk = Transformer(c, name="trunk")
    if not c.tied_embeddings:
      self.lm_head = nn.Dense(
          c.vocab_size, use_bias=False, dtype=c.dtype, param_dtype=c.param_dtype,
          kernel_init=nn.with_logical_partitioning(
              nn.initializers.normal(c.init_std), ("embed", "vocab")), name="lm_head")

  def __call__(self, tokens, mask=None, positions=None, cache: Optional[Cache] = None,
               cache_index=None, logits_slice: Optional[tuple[int, int]] = None):
    """`logits_slice=(start, length)` (static) returns only those positions' logits:
    the LM head is the largest matmul of a small model, and PPO needs only the
    response's predictions (and sampling only the prefill's last position). The
    trunk's last layer then also runs only there (transformer.py, `read`)."""
    if mask is None:
      mask = jnp.ones(tokens.shape, jnp.int32)
    if positions is None:
      if cache is not None:
        raise ValueError("cached decoding needs explicit positions")
      positions = positions_from_mask(mask)
    h, new_cache = self.trunk(tokens, positions, mask, cache, cache_index,
                              read=logits_slice)
    if self.config.tied_embeddings:
      logits = self.trunk.logits(h)
    else:
      logits = as_token_rows(self.lm_head, h)
    logits = constrain(logits.astype(jnp.float32), ("batch", "length", "act_vocab"))
    return logits if cache is None else (logits, new_cache)


class ScalarModel(nn.Module):
  """Trunk + linear head: `gain * head(h) + bias` at every position, float32.

  `read` (a static (start, length) slice or indices [B, Q]) returns the scalars at
  those positions only, and runs the trunk's last layer only there.
  """
  config: TransformerConfig

  @nn.compact
  def __call__(self, tokens, mask=None, positions=None, read=None):
    c = self.config
    if mask is None:
      mask = jnp.ones(tokens.shape, jnp.int32)
    h, _ = Transformer(c, name="trunk")(tokens, _positions(mask, positions), mask,
                                        read=read)
    # Head init normal(0, 1/sqrt(d_model + 1)), as in Stiennon et al. 2020.
    head = nn.Dense(1, dtype=jnp.float32, param_dtype=c.param_dtype,
                    kernel_init=nn.with_logical_partitioning(
                        nn.initializers.normal(1.0 / (c.d_model + 1) ** 0.5),
                        ("embed", None)),
                    bias_init=nn.with_logical_partitioning(
                        nn.initializers.zeros_init(), (None,)), name="head")
    gain = self.param("gain", nn.with_logical_partitioning(
        nn.initializers.ones_init(), ()), (), c.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(
        nn.initializers.zeros_init(), ()), (), c.param_dtype)
    scores = head(h.astype(jnp.float32))[..., 0]
    return gain * scores + bias


class ValueModel(ScalarModel):
  """PPO critic: a value estimate at every position [B, T]."""


def last_token_index(mask: jax.Array) -> jax.Array:
  """Index of the last real token of each row (0 for an all-padding row)."""
  length = mask.shape[-1]
  return jnp.max(jnp.where(mask > 0, jnp.arange(length), 0), axis=-1)


class RewardModel(ScalarModel):
  """Reward per sequence [B], read at the last real token (the response's EOS)."""

  def __call__(self, tokens, mask=None, positions=None):
    if mask is None:
      mask = jnp.ones(tokens.shape, jnp.int32)
    return super().__call__(tokens, mask, positions, read=last_token_index(mask)[:, None])[:, 0]


def join_prompt_response(prompt_tokens, prompt_mask, response_tokens, response_mask):
  """[left-padded prompt | right-padded response] as one sequence and its mask."""
  tokens = jnp.concatenate([prompt_tokens, response_tokens], axis=-1)
  mask = jnp.concatenate([prompt_mask, response_mask], axis=-1)
  return tokens, mask.astype(jnp.int32)


def response_logits(policy: PolicyModel, params, prompt_tokens, prompt_mask,
                    response_tokens, response_mask) -> jax.Array:
  """Teacher-forced logits that predict each response token: [B, R, V].

  The logits at position t predict token t + 1, so the response's predictions are
  the positions from the last prompt token to the second-to-last response token.
  """
  tokens, mask = join_prompt_response(prompt_tokens, prompt_mask, response_tokens,
                                      response_mask)
  prompt_len, response_len = prompt_tokens.shape[-1], response_tokens.shape[-1]
  return policy.apply({"params": params}, tokens, mask,
                      logits_slice=(prompt_len - 1, response_len))
