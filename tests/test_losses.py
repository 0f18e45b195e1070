"""rlhf_jax.losses against hand-written numpy / pure-Python references.

The references are deliberately naive (explicit loops over prompts, pairs, rows and
time steps) so that they are obviously the formulas of DESIGN.md §6 and share no
code or vectorisation trick with the implementation under test.
"""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import losses

RTOL, ATOL = 1e-5, 1e-5


def _log_sigmoid(x: float) -> float:
  return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _prefix_mask(rng, b: int, t: int) -> np.ndarray:
  """Random prefix masks, always including an all-zero and an all-one row."""
  lengths = rng.integers(0, t + 1, size=b)
  lengths[0], lengths[1] = 0, t
  return (np.arange(t)[None, :] < lengths[:, None]).astype(np.float32)


# --------------------------------------------------------------------------------
# Reward-model ranking loss
# --------------------------------------------------------------------------------


def _rm_reference(rewards, ranks, valid, weight):
  """Per prompt: mean over pairs (w, l) with rank_w < rank_l of
  -log sigmoid(r_w - r_l); prompts weighted by `weight`, pair-less ones skipped."""
  loss_num = loss_den = 0.0
  n = correct = chosen = rejected = margin = 0.0
  for b in range(rewards.shape[0]):
    pairs = [(i, j) for i in range(rewards.shape[1]) for j in range(rewards.shape[1])
             if valid[b, i] and valid[b, j] and ranks[b, i] < ranks[b, j]]
    if not pairs:
      continue
    lb = -sum(_log_sigmoid(float(rewards[b, i] - rewards[b, j])) for i, j in pairs)
    loss_num += weight[b] * lb / len(pairs)
    loss_den += weight[b]
    for i, j in pairs:
      rw, rl = float(rewards[b, i]), float(rewards[b, j])
      n += weight[b]
      correct += weight[b] * (rw > rl)
      chosen += weight[b] * rw
      rejected += weight[b] * rl
      margin += weight[b] * (rw - rl)
  return {
      "loss": loss_num / loss_den if loss_den else 0.0,
      "rm/accuracy": correct / n if n else 0.0,
      "rm/chosen_reward": chosen / n if n else 0.0,
      "rm/rejected_reward": rejected / n if n else 0.0,
      "rm/margin": margin / n if n else 0.0,
      "rm/num_pairs": n,
      "rm/num_prompts": loss_den,
  }


@pytest.mark.parametrize("k", range(2, 10))
def test_rm_loss_matches_reference_with_ties_and_padding(k):
  rng = np.random.default_rng(k)
  b = 7
  rewards = rng.normal(size=(b, k)).astype(np.float32) * 2
  # Few distinct ranks -> many ties; some prompts have fewer than K responses.
  ranks = rng.integers(0, max(2, k - 2), size=(b, k)).astype(np.int32)
  valid = (rng.random((b, k)) > 0.25).astype(np.int32)
  valid[0] = 1                # a full prompt
  valid[1] = 0                # an all-padding prompt: no pairs, no contribution
  ranks[2] = 3                # all tied: no pairs
  weight = np.ones(b, np.float32)
  weight[-1] = 0.0            # a padding example
  loss, metrics = jax.jit(losses.rm_ranking_loss)(rewards, ranks, valid, weight)
  ref = _rm_reference(rewards, ranks, valid, weight)
  np.testing.assert_allclose(loss, ref["loss"], rtol=RTOL, atol=ATOL)
  for name in ("rm/accuracy", "rm/chosen_reward", "rm/rejected_reward",
               "rm/margin", "rm/num_pairs", "rm/num_prompts"):
    np.testing.assert_allclose(metrics[name], ref[name], rtol=RTOL, atol=ATOL,
                               err_msg=name)


@pytest.mark.parametrize("k", [2, 4, 9])
def test_kwise_loss_is_mean_of_its_pairwise_losses(k):
  rng = np.random.default_rng(100 + k)
  b = 5
  rewards = rng.normal(size=(b, k)).astype(np.float32)
  ranks = np.stack([rng.permutation(k) for _ in range(b)]).astype(np.int32)
  valid = np.ones((b, k), np.int32)
  rm_loss = jax.jit(losses.rm_ranking_loss)
  kwise, _ = rm_loss(rewards, ranks, valid)

  # Each of the C(K,2) pairs as its own K = 2 example, averaged per prompt.
  per_prompt = []
  for i in range(b):
    pair_losses = []
    for u, v in itertools.combinations(range(k), 2):
      pl, _ = rm_loss(rewards[i:i + 1, [u, v]],
                                     ranks[i:i + 1, [u, v]], valid[i:i + 1, :2])
      pair_losses.append(float(pl))
    assert len(pair_losses) == math.comb(k, 2)
    per_prompt.append(np.mean(pair_losses))
  np.testing.assert_allclose(kwise, np.mean(per_prompt), rtol=RTOL, atol=ATOL)


def test_rm_pairwise_accuracy_and_margin_by_hand():
  rewards = np.array([[2.0, 1.0], [0.0, 3.0], [5.0, 5.0]], np.float32)
  ranks = np.array([[0, 1], [0, 1], [1, 0]], np.int32)
  loss, m = jax.jit(losses.rm_ranking_loss)(rewards, ranks,
                                            np.ones((3, 2), np.int32))
  # pairs (w - l): 2-1 = 1, 0-3 = -3, 5-5 = 0 (equal rewards are not "correct").
  expected = -(_log_sigmoid(1.0) + _log_sigmoid(-3.0) + _log_sigmoid(0.0)) / 3
  np.testing.assert_allclose(loss, expected, rtol=RTOL)
  np.testing.assert_allclose(m["rm/accuracy"], 1 / 3, rtol=RTOL)
  np.testing.assert_allclose(m["rm/margin"], (1 - 3 + 0) / 3, rtol=RTOL)
  np.testing.assert_allclose(m["rm/chosen_reward"], (2 + 0 + 5) / 3, rtol=RTOL)
  np.testing.assert_allclose(m["rm/rejected_reward"], (1 + 3 + 5) / 3, rtol=RTOL)


def test_rm_loss_is_stable_and_gradient_finite_for_huge_margins():
  rewards = jnp.array([[1e4, -1e4], [-1e4, 1e4]], jnp.float32)
  ranks = jnp.array([[0, 1], [0, 1]], jnp.int32)
  valid = jnp.ones((2, 2), jnp.int32)
  f = lambda r: losses.rm_ranking_loss(r, ranks, valid)[0]
  loss, grad = jax.jit(jax.value_and_grad(f))(rewards)
  np.testing.assert_allclose(loss, 1e4, rtol=1e-6)  # (0 + 2e4) / 2
  assert np.all(np.isfinite(grad))


def test_rm_loss_all_padding_batch_is_zero_not_nan():
  loss, m = jax.jit(losses.rm_ranking_loss)(np.zeros((2, 3), np.float32),
                                            np.zeros((2, 3), np.int32),
                                            np.zeros((2, 3), np.int32))
  assert float(loss) == 0.0 and float(m["rm/accuracy"]) == 0.0


# --------------------------------------------------------------------------------
# Cross-entropy, log-probs, entropy
# --------------------------------------------------------------------------------


def _log_softmax_np(z):
  z = z.astype(np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_logprobs_entropy_and_cross_entropy_match_numpy():
  rng = np.random.default_rng(0)
  b, t, v = 3, 5, 11
  logits = (rng.normal(size=(b, t, v)) * 3).astype(np.float32)
  tokens = rng.integers(0, v, size=(b, t)).astype(np.int32)
  mask = _prefix_mask(rng, b, t)
  weight = np.array([1.0, 1.0, 0.0], np.float32)
  temp = 0.7

  lp = _log_softmax_np(logits / temp)
  ref_lp = np.take_along_axis(lp, tokens[..., None], -1)[..., 0]
  np.testing.assert_allclose(losses.logprobs_of(logits, tokens, temp), ref_lp,
                             rtol=RTOL, atol=ATOL)
  ref_ent = -(np.exp(lp) * lp).sum(-1)
  np.testing.assert_allclose(losses.entropy_from_logits(logits, temp), ref_ent,
                             rtol=RTOL, atol=ATOL)

  lp1 = _log_softmax_np(logits)
  num = den = 0.0
  for i in range(b):
    for j in range(t):
      w = mask[i, j] * weight[i]
      num -= w * lp1[i, j, tokens[i, j]]
      den += w
  loss, count = jax.jit(losses.token_cross_entropy)(logits, tokens, mask, weight)
  np.testing.assert_allclose(loss, num / den, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(count, den)


def test_cross_entropy_of_empty_mask_is_zero():
  loss, count = jax.jit(losses.token_cross_entropy)(
      np.zeros((1, 2, 3), np.float32), np.zeros((1, 2), np.int32),
      np.zeros((1, 2), np.float32))
  assert float(loss) == 0.0 and float(count) == 0.0


# --------------------------------------------------------------------------------
# Masked statistics and whitening
# --------------------------------------------------------------------------------


def test_masked_mean_var_and_whiten_match_numpy():
  rng = np.random.default_rng(1)
  x = (rng.normal(size=(6, 9)) * 3 + 1.5).astype(np.float32)
  mask = _prefix_mask(rng, 6, 9)
  real = x[mask > 0].astype(np.float64)
  np.testing.assert_allclose(losses.masked_mean(x, mask), real.mean(), rtol=RTOL)
  np.testing.assert_allclose(losses.masked_var(x, mask), real.var(), rtol=RTOL)
  np.testing.assert_allclose(losses.masked_var(x, mask, unbiased=True),
                             real.var(ddof=1), rtol=RTOL)

  ref = np.zeros_like(x, np.float64)
  ref_noshift = np.zeros_like(x, np.float64)
  for i in range(x.shape[0]):
    for j in range(x.shape[1]):
      if mask[i, j]:
        ref[i, j] = (x[i, j] - real.mean()) / math.sqrt(real.var() + 1e-8)
        ref_noshift[i, j] = ref[i, j] + real.mean()
  w = losses.whiten(x, mask)
  np.testing.assert_allclose(w, ref, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(losses.whiten(x, mask, shift_mean=False), ref_noshift,
                             rtol=RTOL, atol=ATOL)
  assert np.all(np.asarray(w)[mask == 0] == 0.0)
  # Padding values must not matter at all.
  x2 = np.where(mask > 0, x, 1e6).astype(np.float32)
  np.testing.assert_allclose(losses.whiten(x2, mask), w, rtol=RTOL, atol=ATOL)


def test_explained_variance():
  rng = np.random.default_rng(2)
  ret = rng.normal(size=(4, 7)).astype(np.float32)
  val = (ret + 0.3 * rng.normal(size=(4, 7))).astype(np.float32)
  mask = _prefix_mask(rng, 4, 7)
  r, v = ret[mask > 0].astype(np.float64), val[mask > 0].astype(np.float64)
  np.testing.assert_allclose(losses.explained_variance(val, ret, mask),
                             1 - np.var(r - v) / np.var(r), rtol=1e-4)
  np.testing.assert_allclose(losses.explained_variance(ret, ret, mask), 1.0)
  assert float(losses.explained_variance(val, np.ones_like(ret), mask)) == 0.0


# --------------------------------------------------------------------------------
# KL estimators and per-token rewards
# --------------------------------------------------------------------------------


def test_k1_and_k3_kl_match_numpy():
  rng = np.random.default_rng(3)
  logp = -rng.exponential(size=(3, 8)).astype(np.float32)
  ref = -rng.exponential(size=(3, 8)).astype(np.float32)
  mask = _prefix_mask(rng, 3, 8)
  k1 = np.zeros((3, 8))
  k3 = np.zeros((3, 8))
  for i in range(3):
    for j in range(8):
      d = float(ref[i, j]) - float(logp[i, j])
      k1[i, j] = (float(logp[i, j]) - float(ref[i, j])) * mask[i, j]
      k3[i, j] = (math.exp(d) - 1 - d) * mask[i, j]
  np.testing.assert_allclose(losses.kl_penalty(logp, ref, "k1", mask), k1,
                             rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(losses.kl_penalty(logp, ref, "k3", mask), k3,
                             rtol=RTOL, atol=ATOL)
  assert np.all(np.asarray(losses.kl_penalty(logp, ref, "k3")) >= 0)
  # k3 stays accurate (relative) when policy and reference nearly agree.
  for d in (1e-4, -3e-3, 0.0999, -0.1001, 0.5, -2.0):
    d32 = float(np.float32(d))
    np.testing.assert_allclose(
        losses.kl_penalty(np.float32(0), np.float32(d32), "k3"),
        math.expm1(d32) - d32, rtol=2e-6, err_msg=str(d))
  with pytest.raises(ValueError):
    losses.kl_penalty(logp, ref, "k2")


def test_per_token_rewards_score_on_last_real_token_never_padding():
  rng = np.random.default_rng(4)
  b, t = 6, 7
  mask = _prefix_mask(rng, b, t)   # row 0 empty, row 1 full
  kl = rng.normal(size=(b, t)).astype(np.float32)
  kl_padded = np.where(mask > 0, kl, 99.0).astype(np.float32)  # garbage in padding
  score = rng.normal(size=b).astype(np.float32) + 10.0
  beta = 0.1
  ref = np.zeros((b, t))
  for i in range(b):
    n = int(mask[i].sum())
    for j in range(n):
      ref[i, j] = -beta * kl[i, j]
    if n:
      ref[i, n - 1] += score[i]
  out = np.asarray(jax.jit(losses.per_token_rewards)(
      kl_padded, score, mask, jnp.float32(beta)))
  np.testing.assert_allclose(out, ref, rtol=RTOL, atol=ATOL)
  assert np.all(out[mask == 0] == 0.0)       # nothing on padding, score included
  assert np.all(out[0] == 0.0)               # no real token: nothing at all
  np.testing.assert_allclose(out.sum(1) - (-beta * (kl * mask).sum(1)),
                             score * (mask.sum(1) > 0), rtol=RTOL, atol=1e-4)


def test_last_token_index():
  mask = np.array([[0, 0, 0], [1, 1, 0], [1, 1, 1], [0, 1, 1]], np.int32)
  np.testing.assert_array_equal(losses.last_token_index(mask), [-1, 1, 2, 2])


# --------------------------------------------------------------------------------
# GAE
# --------------------------------------------------------------------------------


def _gae_reference(rewards, values, mask, gamma, lam):
  b, t = rewards.shape
  adv = np.zeros((b, t))
  for i in range(b):
    n = int(mask[i].sum())          # real tokens are positions 0 .. n-1
    last_a = 0.0
    for j in reversed(range(n)):
      next_v = float(values[i, j + 1]) if j + 1 < n else 0.0
      delta = float(rewards[i, j]) + gamma * next_v - float(values[i, j])
      last_a = delta + gamma * lam * last_a
      adv[i, j] = last_a
  ret = np.where(mask > 0, adv + values, 0.0)
  return adv, ret


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.95), (0.9, 1.0),
                                       (1.0, 0.0), (0.5, 0.3)])
def test_gae_matches_python_loop(gamma, lam):
  rng = np.random.default_rng(int(gamma * 100 + lam * 10))
  b, t = 9, 13
  mask = _prefix_mask(rng, b, t)
  rewards = rng.normal(size=(b, t)).astype(np.float32)
  values = rng.normal(size=(b, t)).astype(np.float32)
  # Garbage after the stop token must not leak into anything.
  rewards_p = np.where(mask > 0, rewards, 50.0).astype(np.float32)
  values_p = np.where(mask > 0, values, -50.0).astype(np.float32)
  adv, ret = jax.jit(losses.gae)(rewards_p, values_p, mask, gamma, lam)
  ref_adv, ref_ret = _gae_reference(rewards, values, mask, gamma, lam)
  np.testing.assert_allclose(adv, ref_adv, rtol=RTOL, atol=1e-4)
  np.testing.assert_allclose(ret, ref_ret, rtol=RTOL, atol=1e-4)
  assert np.all(np.asarray(adv)[mask == 0] == 0.0)
  assert np.all(np.asarray(ret)[mask == 0] == 0.0)


def test_gae_gamma_lam_one_gives_reward_to_go():
  """With gamma = lam = 1, returns are the undiscounted reward-to-go."""
  rng = np.random.default_rng(5)
  mask = _prefix_mask(rng, 4, 6)
  r = rng.normal(size=(4, 6)).astype(np.float32) * mask
  v = rng.normal(size=(4, 6)).astype(np.float32)
  _, ret = losses.gae(r, v, mask, 1.0, 1.0)
  to_go = np.cumsum(r[:, ::-1], axis=1)[:, ::-1] * mask
  np.testing.assert_allclose(ret, to_go, rtol=RTOL, atol=1e-4)


# --------------------------------------------------------------------------------
# PPO losses
# --------------------------------------------------------------------------------


def test_ppo_policy_loss_matches_numpy():
  rng = np.random.default_rng(6)
  b, t, clip = 5, 8, 0.2
  mask = _prefix_mask(rng, b, t)
  old = -rng.exponential(size=(b, t)).astype(np.float32)
  logp = (old + 0.4 * rng.normal(size=(b, t))).astype(np.float32)
  adv = rng.normal(size=(b, t)).astype(np.float32)
  total = clipped = kl = n = 0.0
  for i in range(b):
    for j in range(t):
      if not mask[i, j]:
        continue
      ratio = math.exp(float(logp[i, j]) - float(old[i, j]))
      l1 = -adv[i, j] * ratio
      l2 = -adv[i, j] * min(max(ratio, 1 - clip), 1 + clip)
      total += max(l1, l2)
      clipped += l2 > l1
      kl += 0.5 * (float(logp[i, j]) - float(old[i, j])) ** 2
      n += 1
  loss, m = jax.jit(losses.ppo_policy_loss)(logp, old, adv, mask, clip)
  np.testing.assert_allclose(loss, total / n, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(m["ppo/clipfrac"], clipped / n, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(m["ppo/approxkl"], kl / n, rtol=RTOL, atol=ATOL)
  assert 0 < float(m["ppo/clipfrac"]) < 1     # the test exercises both branches


def test_ppo_policy_gradient_is_zero_when_clipped_and_unclipped_otherwise():
  old = jnp.zeros((1, 2))
  logp = jnp.array([[math.log(1.5), math.log(1.1)]])  # ratio 1.5 (clipped), 1.1
  adv = jnp.ones((1, 2))
  loss = lambda lp: losses.ppo_policy_loss(lp, old, adv, jnp.ones((1, 2)), 0.2)[0]
  g = jax.jit(jax.grad(loss))(logp)
  np.testing.assert_allclose(g, [[0.0, -1.1 / 2]], rtol=1e-6)


def test_ppo_value_loss_matches_numpy():
  rng = np.random.default_rng(7)
  b, t, clip = 5, 8, 0.2
  mask = _prefix_mask(rng, b, t)
  old_v = rng.normal(size=(b, t)).astype(np.float32)
  v = (old_v + 0.5 * rng.normal(size=(b, t))).astype(np.float32)
  ret = rng.normal(size=(b, t)).astype(np.float32)
  total = clipped = n = 0.0
  for i in range(b):
    for j in range(t):
      if not mask[i, j]:
        continue
      vc = min(max(float(v[i, j]), old_v[i, j] - clip), old_v[i, j] + clip)
      e1 = (float(v[i, j]) - ret[i, j]) ** 2
      e2 = (vc - ret[i, j]) ** 2
      total += 0.5 * max(e1, e2)
      clipped += e2 > e1
      n += 1
  loss, m = jax.jit(losses.ppo_value_loss)(v, old_v, ret, mask, clip)
  np.testing.assert_allclose(loss, total / n, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(m["ppo/value_clipfrac"], clipped / n, rtol=RTOL,
                             atol=ATOL)
  assert 0 < float(m["ppo/value_clipfrac"]) < 1


def test_changing_beta_or_gamma_compiles_nothing_new():
  traces = []

  def shaped(kl, score, mask, beta, gamma, lam):
    traces.append(None)
    r = losses.per_token_rewards(kl, score, mask, beta)
    return losses.gae(r, jnp.zeros_like(r), mask, gamma, lam)

  f = jax.jit(shaped)
  kl, mask = np.ones((2, 3), np.float32), np.ones((2, 3), np.float32)
  for beta, gamma in ((0.1, 1.0), (0.2, 0.99), (0.15, 0.9)):
    adv, _ = f(kl, np.zeros(2, np.float32), mask, np.float32(beta),
               np.float32(gamma), np.float32(0.95))
  assert len(traces) == 1
  np.testing.assert_allclose(adv[0, -1], -0.15, rtol=1e-6)
