"""The math of SFT, reward modelling and PPO, apart from any model or loop.

Every function here takes arrays and returns arrays: no parameters, no model calls,
no Python control flow on values, so each one is jit-able, works unchanged on
sharded inputs (a `jnp.sum` over a sharded batch is a global sum under jit), and
can be checked against a few lines of numpy in the tests.

Conventions shared by all functions:
  * Arithmetic is float32 whatever the input dtype: logits and values may arrive as
    bfloat16, and sums over thousands of tokens in bfloat16 lose most of their bits.
  * A `mask` is 1 for real tokens and 0 for padding. Masked positions never enter a
    mean, a variance or a count, and functions that return per-token arrays return
    exactly 0 there, so a later sum cannot pick up garbage from padding.
  * Means over an empty mask are 0, not NaN: an all-padding batch (the tail of an
    eval pass) must not poison the metrics or the gradient.
  * Response masks in PPO are prefixes: 1 up to and including the stop token, 0
    after it (see `sampling.sample`).
"""

from typing import Any, Optional

import jax
import jax.numpy as jnp

Array = Any
Metrics = dict[str, Array]

_F32 = jnp.float32


def _f32(x: Array) -> Array:
  return jnp.asarray(x, _F32)


def _safe_div(num: Array, den: Array) -> Array:
  """num / den, and 0 where den == 0 (the double `where` keeps gradients finite)."""
  ok = den != 0
  return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


# --------------------------------------------------------------------------------
# Masked statistics
# --------------------------------------------------------------------------------


def masked_sum(x: Array, mask: Array, axis=None) -> Array:
  return jnp.sum(_f32(x) * _f32(mask), axis=axis)


def masked_mean(x: Array, mask: Array, axis=None) -> Array:
  """Mean of `x` over positions where `mask` is nonzero (weighted by `mask`).

  Returns 0 where the mask sums to 0, so an all-padding batch gives 0, not NaN.
  """
  mask = _f32(mask)
  return _safe_div(jnp.sum(_f32(x) * mask, axis=axis), jnp.sum(mask, axis=axis))


def masked_var(x: Array, mask: Array, unbiased: bool = False) -> Array:
  """Variance of `x` over all real tokens (one scalar for the whole array).

  Biased (divides by n) by default, unlike TRL's `masked_var`, which applies Bessel's
  correction: the biased form is defined for a single token and makes `whiten`'s
  output have exactly unit variance over real tokens. With the thousands of tokens of
  a PPO batch the two differ by a factor n/(n-1), i.e. not measurably. Pass
  `unbiased=True` for the corrected estimate (0 when n <= 1).
  """
  mask = _f32(mask)
  x = _f32(x)
  mean = masked_mean(x, mask)
  var = masked_mean(jnp.square(x - mean), mask)
  if unbiased:
    n = jnp.sum(mask)
    var = jnp.where(n > 1, var * n / jnp.maximum(n - 1.0, 1.0), 0.0)
  return var


def whiten(x: Array, mask: Array, shift_mean: bool = True,
           eps: float = 1e-8) -> Array:
  """(x - mean) / std over real tokens; 0 at masked positions.

  Statistics come from real tokens only: including the zeros at padding would drag
  the mean towards 0 and shrink the std by a batch-dependent amount. With
  `shift_mean=False` the mean is added back (only the scale changes), which is the
  right thing for rewards, whose sign carries meaning. Uses the biased variance
  (see `masked_var`).
  """
  mask = _f32(mask)
  x = _f32(x)
  mean = masked_mean(x, mask)
  var = masked_var(x, mask)
  out = (x - mean) * jax.lax.rsqrt(var + eps)
  if not shift_mean:
    out = out + mean
  return out * mask


def explained_variance(values: Array, returns: Array, mask: Array) -> Array:
  """1 - Var[R - V] / Var[R] over real tokens: how much of the return V predicts.

  1 is perfect, 0 is no better than a constant, negative is worse than a constant.
  Returns 0 (not NaN) when the returns have zero variance, so that the metric stays
  finite and JSON-writable; that case only arises for degenerate batches.
  """
  var_r = masked_var(returns, mask)
  var_err = masked_var(_f32(returns) - _f32(values), mask)
  return jnp.where(var_r > 0, 1.0 - _safe_div(var_err, var_r), 0.0)


# --------------------------------------------------------------------------------
# Log-probabilities, cross-entropy, entropy
# --------------------------------------------------------------------------------


def logprobs_of(logits: Array, tokens: Array, temperature=1.0) -> Array:
  """log softmax(logits / temperature) at `tokens`: [B,T,V], [B,T] -> [B,T].

  `logits[:, t]` must already be the prediction for `tokens[:, t]` (the caller
  shifts). Computed as z[token] - logsumexp(z), which never materialises a second
  [B,T,V] array of log-probabilities. The temperature must be the sampling
  temperature: PPO's ratios and the KL are then taken under the distribution the
  tokens were actually drawn from. It may be a traced scalar.
  """
  z = _f32(logits) / _f32(temperature)
  picked = jnp.take_along_axis(z, tokens[..., None].astype(jnp.int32), axis=-1)
  return picked[..., 0] - jax.nn.logsumexp(z, axis=-1)


def entropy_from_logits(logits: Array, temperature=1.0) -> Array:
  """Entropy of softmax(logits / temperature) per position: [B,T,V] -> [B,T].

  H = logsumexp(z) - sum_v p_v z_v, which is stable for large logits (no log of a
  probability that underflowed to 0).
  """
  z = _f32(logits) / _f32(temperature)
  p = jax.nn.softmax(z, axis=-1)
  return jax.nn.logsumexp(z, axis=-1) - jnp.sum(p * z, axis=-1)


def token_cross_entropy(logits: Array, targets: Array, mask: Array,
                        weight: Optional[Array] = None) -> tuple[Array, Array]:
  """Mean next-token cross-entropy over real tokens, and the token count.

  Used for SFT (response tokens only: the caller zeros the prompt in `mask`) and for
  the PPO-ptx pretraining term. `weight` [B] is the batch's example weight (0 for
  padding examples). The mean is per token, not per sequence, as in the original
  SFT and ptx objectives; the (weighted) count is returned so that gradient
  accumulation and eval can combine batches exactly: sum(loss_i * count_i) /
  sum(count_i).
  """
  token_w = _f32(mask)
  if weight is not None:
    token_w = token_w * _f32(weight)[:, None]
  nll = -logprobs_of(logits, targets)
  count = jnp.sum(token_w)
  return _safe_div(jnp.sum(nll * token_w), count), count


# --------------------------------------------------------------------------------
# Reward model
# --------------------------------------------------------------------------------


def rm_ranking_loss(rewards: Array, ranks: Array, valid: Array,
                    weight: Optional[Array] = None) -> tuple[Array, Metrics]:
  """InstructGPT's K-wise ranking loss for [B,K] rewards of K responses per prompt.

  For each prompt b, every ordered pair (w, l) of valid responses with
  rank_w < rank_l (lower rank = better) contributes -log sigmoid(r_w - r_l); the
  prompt's loss is the mean over its pairs (1/C(K,2) when all K are valid and
  there are no ties). Ties give no pair; invalid (padding) responses give none.
  Keeping all pairs of a prompt in one batch element, instead of shuffling pairs
  as independent examples, is what InstructGPT found avoids overfitting: each
  response's reward is computed once and used in K-1 comparisons.

  The batch loss is the mean of per-prompt losses weighted by `weight` [B]
  (default 1); prompts with zero pairs have weight 0 (they carry no comparison).

  Metrics are pooled over all pairs of the batch (each pair weighted by its
  prompt's `weight`): 'rm/accuracy' (fraction with r_w > r_l strictly),
  'rm/chosen_reward' (mean r_w), 'rm/rejected_reward' (mean r_l), 'rm/margin'
  (mean r_w - r_l), plus the (weighted) counts 'rm/num_pairs' and 'rm/num_prompts'
  so that eval can combine batches exactly.
  """
  r = _f32(rewards)
  ranks = jnp.asarray(ranks)
  valid = jnp.asarray(valid) > 0
  b = r.shape[0]
  w_ex = jnp.ones((b,), _F32) if weight is None else _f32(weight)

  # pair[b, i, j]: response i is ranked strictly above response j.
  pair = (valid[:, :, None] & valid[:, None, :]
          & (ranks[:, :, None] < ranks[:, None, :]))
  pair = pair.astype(_F32)
  diff = r[:, :, None] - r[:, None, :]  # r_w - r_l for w = i, l = j
  n_pairs = jnp.sum(pair, axis=(1, 2))
  per_prompt = -_safe_div(jnp.sum(pair * jax.nn.log_sigmoid(diff), axis=(1, 2)),
                          n_pairs)
  w_prompt = w_ex * (n_pairs > 0)
  num_prompts = jnp.sum(w_prompt)
  loss = _safe_div(jnp.sum(w_prompt * per_prompt), num_prompts)

  w_pair = pair * w_ex[:, None, None]
  num_pairs = jnp.sum(w_pair)
  pair_mean = lambda v: _safe_div(jnp.sum(w_pair * v), num_pairs)
  diff = jax.lax.stop_gradient(diff)
  r_sg = jax.lax.stop_gradient(r)
  metrics = {
      "rm/accuracy": pair_mean((diff > 0).astype(_F32)),
      "rm/chosen_reward": pair_mean(jnp.broadcast_to(r_sg[:, :, None], diff.shape)),
      "rm/rejected_reward": pair_mean(
          jnp.broadcast_to(r_sg[:, None, :], diff.shape)),
      "rm/margin": pair_mean(diff),
      "rm/num_pairs": num_pairs,
      "rm/num_prompts": num_prompts,
  }
  return loss, metrics


# --------------------------------------------------------------------------------
# PPO: KL, reward shaping, GAE, clipped losses
# --------------------------------------------------------------------------------


def kl_penalty(logp: Array, ref_logp: Array, kind: str = "k1",
               mask: Optional[Array] = None) -> Array:
  """Per-token estimate of KL(policy || reference) from sampled-token log-probs.

  'k1' = logp - ref_logp: unbiased, can be negative per token; the InstructGPT /
  Ziegler penalty. 'k3' = exp(d) - 1 - d with d = ref_logp - logp (Schulman,
  "Approximating KL divergence"): unbiased and never negative, lower variance.
  For |d| < 0.1 (policy close to the reference, the common case) k3 is computed
  from its Taylor series d^2 (1/2 + d/6 + d^2/24 + d^3/120), because
  exp(d) - 1 - d cancels catastrophically in float32 there (even with expm1 the
  relative error at d = 1e-4 is ~1e-3); the series' truncation error is below
  float32 rounding at that cut. With `mask`, padding gives 0.
  """
  logp, ref_logp = _f32(logp), _f32(ref_logp)
  if kind == "k1":
    kl = logp - ref_logp
  elif kind == "k3":
    d = ref_logp - logp
    series = d * d * (0.5 + d * (1 / 6 + d * (1 / 24 + d / 120)))
    kl = jnp.where(jnp.abs(d) < 0.1, series, jnp.expm1(d) - d)
  else:
    raise ValueError(f"unknown KL estimator {kind!r}; expected 'k1' or 'k3'")
  if mask is not None:
    kl = kl * _f32(mask)
  return kl


def last_token_index(mask: Array) -> Array:
  """Index of the last real token of each row, -1 for rows with none: [B,T] -> [B].

  Taken as the largest index where mask is 1, which equals sum(mask) - 1 for the
  prefix masks of responses, and still lands on a real token for any other mask.
  """
  t = jnp.arange(mask.shape[-1], dtype=jnp.int32)
  return jnp.max(jnp.where(jnp.asarray(mask) > 0, t, -1), axis=-1)


def per_token_rewards(kl: Array, score: Array, mask: Array, beta) -> Array:
  """r_t = -beta * kl_t on real tokens, plus the score on each row's last real token.

  This is the Ziegler / InstructGPT reward shaping: the KL penalty is paid token by
  token, the RM (or missing-EOS penalty) score arrives once, at the end of the
  response. Padding gets exactly 0 and never the score; a row with no real tokens
  gets nothing at all. `beta` may be a traced scalar (changing it between
  iterations then compiles nothing new).
  """
  mask = _f32(mask)
  rewards = -_f32(beta) * _f32(kl) * mask
  last = last_token_index(mask)
  t = jnp.arange(mask.shape[-1], dtype=jnp.int32)
  at_last = (t[None, :] == last[:, None]).astype(_F32)  # all 0 when last == -1
  return rewards + at_last * _f32(score)[:, None]


def gae(rewards: Array, values: Array, mask: Array, gamma=1.0,
        lam=0.95) -> tuple[Array, Array]:
  """Generalised advantage estimation, as a reverse `lax.scan` over time.

    delta_t = r_t + gamma * V_{t+1} - V_t
    A_t     = delta_t + gamma * lam * A_{t+1}
    R_t     = A_t + V_t

  The episode ends at the last real token: V and A beyond it are 0 (there is no
  future after the stop token, so nothing is bootstrapped), which the scan gets by
  zeroing the carried V and A at masked positions. Advantages and returns are 0 at
  masked positions. `mask` is expected to be a prefix (1s then 0s); a 0 inside a row
  would act as an episode boundary. Inputs are [B,T]; gamma and lam may be traced.
  """
  mask = _f32(mask)
  r = _f32(rewards) * mask
  v = _f32(values) * mask
  gamma, lam = _f32(gamma), _f32(lam)

  def step(carry, xs):
    next_v, next_a = carry
    r_t, v_t, m_t = xs
    delta = r_t + gamma * next_v - v_t
    a_t = (delta + gamma * lam * next_a) * m_t
    return (v_t, a_t), a_t

  b = r.shape[0]
  init = (jnp.zeros((b,), _F32), jnp.zeros((b,), _F32))
  _, adv = jax.lax.scan(step, init, (r.T, v.T, mask.T), reverse=True)
  adv = adv.T
  return adv, (adv + v) * mask


def ppo_policy_loss(logp: Array, old_logp: Array, advantages: Array, mask: Array,
                    clip=0.2) -> tuple[Array, Metrics]:
  """PPO's clipped surrogate, as a loss: mean over real tokens of
  max(-A * ratio, -A * clip(ratio, 1 - clip, 1 + clip)), ratio = exp(logp - old).

  The max of the two losses (min of the two objectives) removes any incentive to
  move the ratio outside [1 - clip, 1 + clip] in the direction the advantage
  favours. `old_logp` and `advantages` are rollout constants (gradients stopped).
  Metrics: 'ppo/clipfrac' (fraction of real tokens where the clipped term is the
  active one) and 'ppo/approxkl' = 0.5 * mean((logp - old)^2), the estimator used by
  the original OpenAI code.
  """
  mask = _f32(mask)
  old = jax.lax.stop_gradient(_f32(old_logp))
  adv = jax.lax.stop_gradient(_f32(advantages))
  log_ratio = _f32(logp) - old
  ratio = jnp.exp(log_ratio)
  loss1 = -adv * ratio
  loss2 = -adv * jnp.clip(ratio, 1.0 - clip, 1.0 + clip)
  loss = masked_mean(jnp.maximum(loss1, loss2), mask)
  metrics = {
      "ppo/clipfrac": masked_mean((loss2 > loss1).astype(_F32), mask),
      "ppo/approxkl": 0.5 * masked_mean(
          jnp.square(jax.lax.stop_gradient(log_ratio)), mask),
  }
  return loss, metrics


def ppo_value_loss(values: Array, old_values: Array, returns: Array, mask: Array,
                   clip=0.2) -> tuple[Array, Metrics]:
  """Clipped value loss: 0.5 * mean over real tokens of
  max((V - R)^2, (clip(V, V_old - clip, V_old + clip) - R)^2).

  Clipping around the rollout-time value keeps the critic from jumping far in one
  update, mirroring the policy clip (as in the original OpenAI baselines PPO2).
  Metric 'ppo/value_clipfrac': fraction of real tokens where the clipped term is the
  larger one.
  """
  mask = _f32(mask)
  v = _f32(values)
  old = jax.lax.stop_gradient(_f32(old_values))
  ret = jax.lax.stop_gradient(_f32(returns))
  v_clipped = old + jnp.clip(v - old, -clip, clip)
  err1 = jnp.square(v - ret)
  err2 = jnp.square(v_clipped - ret)
  loss = 0.5 * masked_mean(jnp.maximum(err1, err2), mask)
  metrics = {
      "ppo/value_clipfrac": masked_mean((err2 > err1).astype(_F32), mask),
  }
  return loss, metrics
