"""Reward-model training on comparisons and rankings (InstructGPT's K-wise loss).

  make_rm_step(model, tx, schedule, ...) -> step(state, batch, rng) -> (state, metrics)
  make_rm_eval_step(model)               -> eval_step(params, batch) -> sums
  rm_eval_metrics(sums)                  -> {'eval/loss/rm', 'eval/rm/accuracy', ...}
  make_score_fn(model)                   -> score(params, batch) -> rewards [B]
  normalized_gain_bias(...)              -> the gain/bias that give mean 0 (std 1)

A comparison batch holds, per prompt, K responses [B, K, R] with ranks [B, K]
(lower is better, equal ranks tie) and `response_valid` [B, K]. All K responses
of a prompt live in one batch element and each is scored by exactly one forward
pass, which shares the prompt's keys and values (`response_rewards`). The reward
is read at each response's last real token, its EOS. Every ordered pair (w ranked
above l) then costs -log sigmoid(r_w - r_l), averaged per prompt
(losses.rm_ranking_loss).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax import losses, optim
from rlhf_jax.models.heads import RewardModel, join_prompt_response, last_token_index
from rlhf_jax.models.transformer import (CACHE_SLOT_AXIS, Transformer, init_cache,
                                         positions_from_mask)

Batch = dict[str, jax.Array]

# Aux sums of the loss function; metrics divide them once per (accumulated) batch.
_PAIR_SUMS = ("correct", "chosen", "rejected", "margin")


def _scalar_head(params, h: jax.Array) -> jax.Array:
  """`gain * head(h) + bias` of heads.ScalarModel, from trunk hidden states [..., d].

  Mirrors ScalarModel so the shared-prompt pass below can run the trunk itself;
  tests check the two give the same rewards.
  """
  head = params["head"]
  scores = (h.astype(jnp.float32) @ head["kernel"].astype(jnp.float32))[..., 0]
  return params["gain"] * (scores + head["bias"][0]) + params["bias"]


def response_rewards(model: RewardModel, params, batch: Batch) -> jax.Array:
  """Rewards [B, K] of every response; the prompt is encoded once for all K.

  The trunk first runs over the prompts [B, P] alone, keeping each layer's keys
  and values; those are repeated K times (b-major: rows b*K .. b*K + K-1 belong to
  prompt b, so each data shard keeps its own rows) and the B*K responses [B*K, R]
  then attend to them as the continuation of their prompt. Each response still
  gets exactly one forward pass, and its reward equals that of the full
  [prompt | response] sequence, but the prompt's tokens go through the model once
  instead of K times: for P = R and K = 2 a quarter of the matmul FLOPs, more for
  long prompts and InstructGPT's K up to 9. The reward is read at each response's
  last real token (its EOS).
  """
  c = model.config
  responses, response_mask = batch["response_tokens"], batch["response_mask"]
  b, k, r = responses.shape
  prompt_mask = batch["prompt_mask"]
  p = prompt_mask.shape[-1]
  trunk = Transformer(c)
  trunk_params = {"params": params["trunk"]}
  # Only the prompt's keys and values are needed: no position is read.
  _, cache = trunk.apply(trunk_params, batch["prompt_tokens"],
                         positions_from_mask(prompt_mask), prompt_mask,
                         init_cache(c, b, p), 0, read=(0, 0))
  def make_room(x):  # r empty slots after the prompt, then one copy per response
    room = [(0, 0)] * x.ndim
    room[CACHE_SLOT_AXIS] = (0, r)
    return jnp.repeat(jnp.pad(x, room), k, axis=x.ndim - 4)  # the batch axis
  cache = jax.tree.map(make_room, cache)
  mask = jnp.concatenate([jnp.repeat(prompt_mask, k, axis=0),
                          response_mask.reshape(b * k, r)], axis=-1).astype(jnp.int32)
  last = last_token_index(response_mask.reshape(b * k, r))
  h_last, _ = trunk.apply(trunk_params, responses.reshape(b * k, r),
                          positions_from_mask(mask)[:, p:], mask, cache, p,
                          read=last[:, None])
  return _scalar_head(params, h_last[:, 0]).reshape(b, k)


def prompts_with_pairs(ranks, valid, weight) -> jax.Array:
  """Weighted count of prompts that order at least one pair: the loss's
  normaliser (computed without the model, for exact gradient accumulation)."""
  valid = jnp.asarray(valid) > 0
  ranks = jnp.asarray(ranks)
  pair = valid[:, :, None] & valid[:, None, :] & (ranks[:, :, None] < ranks[:, None, :])
  return jnp.sum(jnp.asarray(weight, jnp.float32) * jnp.any(pair, axis=(1, 2)))


def rm_loss_sums(model: RewardModel, params, batch: Batch) -> tuple[jax.Array, dict]:
  """(sum over prompts of the per-prompt loss, metric sums) of one batch."""
  rewards = response_rewards(model, params, batch)
  loss, m = losses.rm_ranking_loss(rewards, batch["ranks"], batch["response_valid"],
                                   batch["weight"])
  pairs = m["rm/num_pairs"]
  sums = {"loss": loss * m["rm/num_prompts"], "prompts": m["rm/num_prompts"],
          "pairs": pairs, "correct": m["rm/accuracy"] * pairs,
          "chosen": m["rm/chosen_reward"] * pairs,
          "rejected": m["rm/rejected_reward"] * pairs, "margin": m["rm/margin"] * pairs}
  return sums["loss"], sums


def _pair_means(sums: dict) -> dict:
  pairs = sums["pairs"]
  mean = lambda k: jnp.where(pairs > 0, sums[k] / jnp.maximum(pairs, 1.0), 0.0)
  return {"rm/accuracy": mean("correct"), "rm/chosen_reward": mean("chosen"),
          "rm/rejected_reward": mean("rejected"), "rm/margin": mean("margin")}


def make_rm_step(model: RewardModel, tx: optax.GradientTransformation,
                 schedule: Callable, *, accum_steps: int = 1) -> Callable:
  """A pure RM train step: `step(state, batch, rng) -> (state, metrics)`.

  With `accum_steps > 1` the prompts are split into micro-batches (all K
  responses of a prompt stay together) and the gradients summed; each prompt's
  loss is divided by the whole batch's prompt count, so the update equals the
  unsplit one. Metrics: 'loss/rm', 'rm/accuracy', 'rm/chosen_reward',
  'rm/rejected_reward', 'rm/margin', 'rm/pairs', 'optim/*'.
  """
  def step(state: optim.TrainState, batch: Batch, rng: jax.Array):
    denominator = jnp.maximum(
        prompts_with_pairs(batch["ranks"], batch["response_valid"], batch["weight"]), 1.0)

    def loss_fn(params, micro, _):
      loss_sum, sums = rm_loss_sums(model, params, micro)
      return loss_sum / denominator, sums

    loss, sums, grads = optim.accumulate_gradients(loss_fn, state.params, batch, rng,
                                                   accum_steps)
    state, metrics = optim.apply_gradients(state, grads, loss, tx, schedule)
    metrics.update({"loss/rm": loss, "rm/pairs": sums["pairs"], **_pair_means(sums)})
    return state, metrics

  return step


def make_rm_eval_step(model: RewardModel) -> Callable:
  """`eval_step(params, batch) -> sums` (loss, prompts, pairs, correct, ...), to be
  added over batches on the host and finished by `rm_eval_metrics`."""
  def eval_step(params, batch: Batch):
    return rm_loss_sums(model, params, batch)[1]

  return eval_step


def rm_eval_metrics(sums: dict) -> dict[str, float]:
  """Added-up eval sums -> the logged eval metrics (pooled over all pairs)."""
  sums = {k: float(v) for k, v in sums.items()}
  prompts, pairs = sums["prompts"], sums["pairs"]
  out = {"eval/loss/rm": sums["loss"] / prompts if prompts else 0.0,
         "eval/rm/pairs": pairs, "eval/rm/prompts": prompts}
  for key, name in zip(_PAIR_SUMS, ("accuracy", "chosen_reward", "rejected_reward",
                                    "margin")):
    out[f"eval/rm/{name}"] = sums[key] / pairs if pairs else 0.0
  return out


def make_score_fn(model: RewardModel) -> Callable:
  """`score(params, batch) -> rewards [B]` of demonstration-shaped batches
  (prompt [B, P], one response [B, R]); PPO scores its samples the same way."""
  def score(params, batch: Batch):
    tokens, mask = join_prompt_response(batch["prompt_tokens"], batch["prompt_mask"],
                                        batch["response_tokens"], batch["response_mask"])
    return model.apply({"params": params}, tokens, mask)

  return score


def normalized_gain_bias(rewards: np.ndarray, weights: np.ndarray, gain: float, bias: float,
                         normalize_gain: bool) -> dict[str, float]:
  """New (gain, bias) so that rewards r = gain*h + bias of the reference responses
  get mean 0 (and std 1 with `normalize_gain`).

  r' = (r - mean) / std = (gain/std) * h + (bias - mean)/std; without the gain
  only the bias moves: r' = r - mean. Statistics in float64 over real examples.
  """
  w = np.asarray(weights, np.float64)
  r = np.asarray(rewards, np.float64)
  n = w.sum()
  if n <= 0:
    raise ValueError("no reference responses to normalise the reward model on")
  mean = float((w * r).sum() / n)
  std = float(np.sqrt((w * (r - mean) ** 2).sum() / n))
  scale = 1.0 / std if normalize_gain and std > 0 else 1.0
  return {"gain": gain * scale, "bias": (bias - mean) * scale, "mean_before": mean,
          "std_before": std, "num_responses": int(n)}
