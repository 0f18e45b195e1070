"""Supervised fine-tuning: next-token cross-entropy on demonstrations.

  make_sft_step(policy, tx, schedule, ...)  -> step(state, batch, rng) -> (state, metrics)
  make_sft_eval_step(policy, ...)           -> eval_step(params, batch) -> sums
  sft_eval_metrics(sums)                    -> {'eval/loss/sft', 'eval/sft/perplexity', ...}
  demonstrations_from_comparisons(batch)    -> the best-ranked response of each record

Batches are the demonstration batches of INTERFACES.md: a left-padded prompt
[B, P] and a right-padded response [B, R] ending in EOS. The loss is the mean
over real response tokens (prompt tokens too with `include_prompt_loss`); it is
per token, not per sequence, as in InstructGPT's SFT.

The functions here are pure and unjitted: the trainer jits them once with
explicit shardings, tests and notebooks can jit them on any mesh.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax import losses, optim
from rlhf_jax.models.heads import PolicyModel, join_prompt_response, response_logits

Batch = dict[str, jax.Array]


def target_mask(prompt_mask, response_mask, include_prompt_loss: bool = False):
  """Which next-token predictions count: [B, P + R - 1], 1 where token t + 1 is a
  real target predicted from a real token t.

  Requiring the *predicting* token to be real drops the first real prompt token
  (it follows left padding, so nothing real predicts it).
  """
  prompt_mask = jnp.asarray(prompt_mask, jnp.float32)
  response_mask = jnp.asarray(response_mask, jnp.float32)
  targets = jnp.concatenate(
      [prompt_mask if include_prompt_loss else jnp.zeros_like(prompt_mask), response_mask],
      axis=-1)
  inputs = jnp.concatenate([prompt_mask, response_mask], axis=-1)
  return targets[:, 1:] * inputs[:, :-1]


def _weighted_tokens(batch: Batch, include_prompt_loss: bool):
  mask = target_mask(batch["prompt_mask"], batch["response_mask"], include_prompt_loss)
  return mask * jnp.asarray(batch["weight"], jnp.float32)[:, None]


def sft_nll_sum(policy: PolicyModel, params, batch: Batch,
                include_prompt_loss: bool = False) -> tuple[jax.Array, jax.Array]:
  """(sum of token NLLs, weighted token count) of a batch; padding examples
  (weight 0) count for nothing."""
  weights = _weighted_tokens(batch, include_prompt_loss)
  if include_prompt_loss:
    tokens, mask = join_prompt_response(batch["prompt_tokens"], batch["prompt_mask"],
                                        batch["response_tokens"], batch["response_mask"])
    logits = policy.apply({"params": params}, tokens, mask)
    mean, count = losses.token_cross_entropy(logits[:, :-1], tokens[:, 1:], weights)
  else:
    # Only the response's predictions: the LM head (the largest matmul of a small
    # model with a big vocabulary) skips the prompt positions.
    logits = response_logits(policy, params, batch["prompt_tokens"], batch["prompt_mask"],
                             batch["response_tokens"], batch["response_mask"])
    p = batch["prompt_tokens"].shape[-1]
    mean, count = losses.token_cross_entropy(logits, batch["response_tokens"],
                                             weights[:, p - 1:])
  return mean * count, count


def make_sft_step(policy: PolicyModel, tx: optax.GradientTransformation,
                  schedule: Callable, *, accum_steps: int = 1,
                  include_prompt_loss: bool = False) -> Callable:
  """A pure SFT train step: `step(state, batch, rng) -> (state, metrics)`.

  With `accum_steps > 1` the batch is split into that many micro-batches and the
  gradients summed (optim.accumulate_gradients); the loss is normalised by the
  token count of the whole batch, so the update equals the unsplit one.
  Metrics: 'loss/sft', 'sft/perplexity', 'sft/tokens', 'optim/*'.
  """
  def step(state: optim.TrainState, batch: Batch, rng: jax.Array):
    total_tokens = jnp.sum(_weighted_tokens(batch, include_prompt_loss))
    denominator = jnp.maximum(total_tokens, 1.0)

    def loss_fn(params, micro, _):
      nll, count = sft_nll_sum(policy, params, micro, include_prompt_loss)
      return nll / denominator, {"tokens": count}

    loss, aux, grads = optim.accumulate_gradients(loss_fn, state.params, batch, rng,
                                                  accum_steps)
    state, metrics = optim.apply_gradients(state, grads, loss, tx, schedule)
    metrics.update({"loss/sft": loss, "sft/perplexity": jnp.exp(loss),
                    "sft/tokens": aux["tokens"]})
    return state, metrics

  return step


def make_sft_eval_step(policy: PolicyModel, *, include_prompt_loss: bool = False
                       ) -> Callable:
  """`eval_step(params, batch) -> {'nll_sum', 'tokens'}`: sums, so the host can add
  batches and divide once (exact over a whole eval set with a padded tail)."""
  def eval_step(params, batch: Batch):
    nll, count = sft_nll_sum(policy, params, batch, include_prompt_loss)
    return {"nll_sum": nll, "tokens": count}

  return eval_step


def sft_eval_metrics(sums: dict) -> dict[str, float]:
  """Added-up eval sums -> the logged eval metrics."""
  tokens = float(sums["tokens"])
  loss = float(sums["nll_sum"]) / tokens if tokens else 0.0
  return {"eval/loss/sft": loss, "eval/sft/perplexity": float(np.exp(loss)),
          "eval/sft/tokens": tokens}


def demonstrations_from_comparisons(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A comparison batch [B, K, R] as demonstrations: each record's best response.

  Lets SFT train on the chosen responses of HH / TL;DR comparisons (and the RM
  normalisation score them). Best = lowest rank among valid responses, the
  first on ties. Host-side numpy; other keys pass through unchanged.
  """
  if np.ndim(batch["response_tokens"]) == 2:
    return batch
  ranks = np.where(batch["response_valid"] > 0, batch["ranks"], np.iinfo(np.int32).max)
  best = np.argmin(ranks, axis=1)
  rows = np.arange(len(best))
  out = {k: v for k, v in batch.items()
         if k not in ("response_tokens", "response_mask", "ranks", "response_valid")}
  out["response_tokens"] = batch["response_tokens"][rows, best]
  out["response_mask"] = batch["response_mask"][rows, best]
  return out
