"""The rollout: where the score lands, what is masked, and that beta never recompiles.

All tests share one `make_rollout_fns` pair (the trainer's factory) whose scoring
function is wrapped in chex.assert_max_traces(n=1): every call below, with several
betas, must reuse the first trace.
"""
import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import sampling
from rlhf_jax.steps import rollout as rollout_lib
from tests.steps.ppo_fixtures import PAD, STOP, VOCAB, prompts, tiny_models, tiny_params

PENALTY = -1.5
BETA = 0.3
B, P, R = 4, 5, 6


@pytest.fixture(scope="module")
def setup():
  models = tiny_models()
  params = tiny_params(models)
  # Hand-written samples carry no log-probs: score them teacher-forced.
  scoring = rollout_lib.ScoringParams(stop_token=STOP, temperature=0.7,
                                      missing_eos_penalty=PENALTY, recompute_logprobs=True)
  sp = sampling.SamplingParams(new_tokens=R, stop_token=STOP, pad_token=PAD,
                               temperature=0.7)
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(rollout_lib, "score", chex.assert_max_traces(rollout_lib.score, n=1))
    fns = rollout_lib.make_rollout_fns(models, sp, scoring)
  pt, pm = prompts(B, P, seed=1)
  return models, params, scoring, fns, pt, pm


def _hand_samples():
  """Four responses: stop at 2, stop at the last slot, no stop, stop first.

  Tokens after the stop token are deliberately NOT the pad id (garbage that only
  the mask marks as padding), so nothing may rely on the token values there.
  """
  rng = np.random.default_rng(3)
  tokens = rng.integers(4, VOCAB, size=(B, R)).astype(np.int32)
  stops = [2, R - 1, None, 0]
  mask = np.zeros((B, R), np.int32)
  for b, s in enumerate(stops):
    if s is None:
      mask[b] = 1
    else:
      tokens[b, s] = STOP
      mask[b, :s + 1] = 1
  zeros = jnp.zeros((B, R), jnp.float32)
  return stops, sampling.Samples(jnp.asarray(tokens), jnp.asarray(mask), zeros, zeros)


def _reference_rm_and_values(models, params, pt, pm, samples):
  """RM scores and critic values with a different layout: each real prompt and its
  real response tokens packed at the left, padding only at the right."""
  pt, pm = np.asarray(pt), np.asarray(pm)
  tokens = np.zeros((B, P + R), np.int32)
  mask = np.zeros((B, P + R), np.int32)
  prompt_lens = pm.sum(-1)
  for b in range(B):
    seq = np.concatenate([pt[b][pm[b] > 0],
                          np.asarray(samples.tokens[b])[np.asarray(samples.mask[b]) > 0]])
    tokens[b, :len(seq)], mask[b, :len(seq)] = seq, 1

  @jax.jit
  def forward(params, tokens, mask):
    return (models.reward.apply({"params": params["reward"]}, tokens, mask),
            models.value.apply({"params": params["value"]}, tokens, mask))
  scores, values = jax.tree.map(np.asarray, forward(params, tokens, mask))
  # The value before response token t sits at packed position prompt_len - 1 + t.
  idx = np.clip(prompt_lens[:, None] - 1 + np.arange(R)[None], 0, P + R - 1)
  values = np.take_along_axis(values, idx, axis=1) * np.asarray(samples.mask)
  return scores, values


def _numpy_gae(rewards, values, mask, gamma=1.0, lam=0.95):
  adv = np.zeros_like(rewards)
  for b in range(rewards.shape[0]):
    n = int(mask[b].sum())
    last = 0.0
    for t in reversed(range(n)):
      next_v = values[b, t + 1] if t + 1 < n else 0.0
      last = rewards[b, t] + gamma * next_v - values[b, t] + gamma * lam * last
      adv[b, t] = last
  return adv, (adv + values) * mask


@pytest.fixture(scope="module")
def hand_batch(setup):
  _, params, _, fns, pt, pm = setup
  stops, samples = _hand_samples()
  batch, metrics = fns.score(params, pt, pm, samples, np.float32(BETA))
  return stops, samples, jax.tree.map(np.asarray, batch), jax.tree.map(float, metrics)


def test_score_lands_on_stop_token_and_padding_is_zero(setup, hand_batch):
  models, params, _, _, pt, pm = setup
  stops, samples, batch, metrics = hand_batch
  mask = np.asarray(samples.mask)
  rm_scores, values = _reference_rm_and_values(models, params, pt, pm, samples)

  for b, stop in enumerate(stops):
    if stop is None:  # no stop token: the penalty, not the RM's output
      assert batch["scores"][b] == pytest.approx(PENALTY)
    else:  # the RM's output at the stop token
      np.testing.assert_allclose(batch["scores"][b], rm_scores[b], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(batch["values"], values, rtol=1e-5, atol=1e-5)

  # Per-token rewards: -beta * kl on real tokens, plus the score exactly at the
  # last real token (the stop token, or the last slot for the no-stop row).
  last = mask.sum(-1) - 1
  expect_rewards = -BETA * batch["kl"]
  expect_rewards[np.arange(B), last] += batch["scores"]
  np.testing.assert_allclose(batch["rewards"], expect_rewards, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(batch["kl"], (batch["logprobs"] - batch["ref_logprobs"]) * mask,
                             atol=1e-6)

  pad = mask == 0
  assert pad.any()
  for key in ("logprobs", "ref_logprobs", "kl", "values", "rewards", "advantages",
              "returns"):
    assert np.all(batch[key][pad] == 0), key
  assert np.all(batch["logprobs"][~pad] < 0)
  assert np.all(batch["values"][~pad] != 0)

  # GAE (gamma 1, lambda 0.95) over each response, then advantages whitened over
  # real tokens only.
  adv, ret = _numpy_gae(batch["rewards"], batch["values"], mask)
  np.testing.assert_allclose(batch["returns"], ret, rtol=1e-5, atol=1e-5)
  real = adv[~pad]
  np.testing.assert_allclose(batch["advantages"][~pad], (real - real.mean()) / real.std(),
                             rtol=1e-4, atol=1e-4)

  assert metrics["ppo/no_eos_fraction"] == pytest.approx(0.25)
  assert metrics["ppo/response_length"] == pytest.approx(mask.sum() / B)
  assert metrics["ppo/kl"] == pytest.approx(batch["kl"].sum(-1).mean(), rel=1e-5, abs=1e-6)
  assert metrics["ppo/non_score_reward"] == pytest.approx(-BETA * metrics["ppo/kl"],
                                                          rel=1e-5, abs=1e-6)
  assert metrics["ppo/score"] == pytest.approx(batch["scores"].mean(), rel=1e-5)


def test_sampled_rollout_logprobs_match_sampler_and_beta_never_recompiles(setup, hand_batch):
  _, params, _, fns, pt, pm = setup
  samples = fns.generate(params["policy"], pt, pm, jax.random.key(0))
  mask = np.asarray(samples.mask)
  # The sampler's mask is a prefix ending at the first stop token; after it, pad.
  for b in range(B):
    n = mask[b].sum()
    assert np.all(mask[b, :n] == 1) and np.all(mask[b, n:] == 0)
    assert STOP not in np.asarray(samples.tokens[b, :n - 1])
    assert np.all(np.asarray(samples.tokens[b, n:]) == PAD)

  # What an adaptive controller does between iterations: a new beta each time.
  # chex.assert_max_traces(n=1) on `score` raises if any of these retraces.
  for beta in (0.05, 0.2, 1.7):
    batch, metrics = fns.score(params, pt, pm, samples, np.float32(beta))
    assert float(metrics["ppo/beta"]) == pytest.approx(beta)
  assert fns.score._cache_size() == 1
  # Teacher-forced log-probs equal the sampler's (same temperature-scaled logits).
  np.testing.assert_allclose(batch["logprobs"], samples.logprobs, atol=1e-5)


def test_scoring_with_the_sampler_logprobs_equals_recomputing_them(setup):
  models, params, scoring, fns, pt, pm = setup
  samples = fns.generate(params["policy"], pt, pm, jax.random.key(4))
  reuse = dataclasses.replace(scoring, recompute_logprobs=False)
  score = lambda s: jax.jit(functools.partial(rollout_lib.score, models, scoring=s))(
      params, pt, pm, samples, np.float32(BETA))
  (recomputed, m_recomputed), (reused, m_reused) = score(scoring), score(reuse)
  for key in ("logprobs", "kl", "rewards", "advantages", "returns"):
    np.testing.assert_allclose(reused[key], recomputed[key], atol=5e-5, err_msg=key)
  # The sampler's per-step entropies give the same mean as the teacher-forced logits.
  assert float(m_reused["ppo/entropy"]) == pytest.approx(float(m_recomputed["ppo/entropy"]),
                                                        rel=1e-5)


def test_reward_fn_replaces_the_reward_model(setup):
  models, params, scoring, _, pt, pm = setup
  stops, samples = _hand_samples()
  count_7 = lambda _p, _pm, r, rm: jnp.sum((r == 7) & (rm > 0), axis=-1).astype(jnp.float32)
  no_rm = {k: v for k, v in params.items() if k != "reward"}
  scores = jax.jit(lambda p, a, b, s: rollout_lib.score(
      models._replace(reward=None), p, a, b, s, 0.1, scoring=scoring,
      reward_fn=count_7)[0]["scores"])(no_rm, pt, pm, samples)
  expect = [(np.asarray(samples.tokens[b]) == 7)[np.asarray(samples.mask[b]) > 0].sum()
            if s is not None else PENALTY for b, s in enumerate(stops)]
  np.testing.assert_allclose(scores, expect)
