"""Tiny model configs shared by the model, sharding and sampler tests."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.models.transformer import TransformerConfig

FAMILIES = ("gpt2", "llama", "neox")


def tiny_config(family: str, **overrides) -> TransformerConfig:
  # llama uses grouped-query attention (4 query heads share 2 key/value heads).
  base = dict(family=family, vocab_size=64, d_model=32, n_layers=2, n_heads=4,
              n_kv_heads=2 if family == "llama" else 4, d_ff=64, max_len=64)
  base.update(overrides)
  return TransformerConfig.from_config(base)


def left_padded_prompts(batch: int, length: int, seed: int = 0, vocab: int = 64,
                        min_real: int = 1):
  """Random prompts of mixed real lengths, left-padded with 0."""
  rng = np.random.default_rng(seed)
  real = rng.integers(min_real, length + 1, size=batch)
  real[0] = length  # one full-length row
  tokens = rng.integers(4, vocab, size=(batch, length))
  mask = (np.arange(length)[None, :] >= (length - real)[:, None]).astype(np.int32)
  return jnp.asarray(tokens * mask, jnp.int32), jnp.asarray(mask)


def init_params(model, seed: int = 0):
  return nn.meta.unbox(
      model.init(jax.random.key(seed), jnp.ones((1, 4), jnp.int32))["params"])


def with_scan(config: TransformerConfig) -> TransformerConfig:
  return dataclasses.replace(config, scan_layers=True)
