"""The reward-model step: K-wise loss through the model, sharding, learning, normalisation."""
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.models import heads
from rlhf_jax.steps import reward
from tests.steps import supervised_fixtures as fx

K_MAX = 9


def ranking_batch(seed: int, b: int = fx.B, k: int = 2, separable: bool = False) -> dict:
  """Comparisons [b, k]. `separable`: better responses use tokens 4..33, worse ones
  34..63, so a model can rank every pair correctly from token identity alone."""
  rng = np.random.default_rng(seed)
  prompt_tokens, prompt_mask = fx.prompts(rng, b)
  ranks = np.tile(np.arange(k, dtype=np.int32), (b, 1))
  if separable:
    # At least one token besides the EOS, or there is nothing to tell apart.
    good_tokens, good_mask = fx.responses(rng, (b, k), low=4, high=34, min_len=2)
    bad_tokens, bad_mask = fx.responses(rng, (b, k), low=34, high=64, min_len=2)
    # The better response sits at a random position: position carries no signal.
    flip = rng.random(b) < 0.5
    ranks[flip] = ranks[flip][:, ::-1]
    is_good = (ranks == 0)[..., None]
    tokens = np.where(is_good, good_tokens, bad_tokens)
    mask = np.where(is_good, good_mask, bad_mask)
  else:
    tokens, mask = fx.responses(rng, (b, k))
  return dict(prompt_tokens=prompt_tokens, prompt_mask=prompt_mask,
              response_tokens=tokens.astype(np.int32), response_mask=mask,
              ranks=ranks.astype(np.int32), response_valid=np.ones((b, k), np.int32),
              weight=np.ones(b, np.float32))


@pytest.fixture(scope="module")
def model():
  return heads.RewardModel(fx.model_config())


@pytest.fixture(scope="module")
def single(model):
  state, step, _ = fx.jitted_step(reward.make_rm_step, model, fx.mesh_of((1, 1, 1)),
                                  ranking_batch(0), learning_rate=3e-2)
  return state, step


def _log_sigmoid(x):
  return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def test_kwise_loss_through_the_model_matches_numpy_for_k_2_to_9(model, single):
  """Prompts with 2..9 valid responses (padded to 9 slots) and tied ranks: each
  response is scored once, on its own sequence, and the step's loss is the
  K-wise loss of those scores."""
  state, _ = single
  rng = np.random.default_rng(3)
  b = K_MAX - 1
  batch = ranking_batch(4, b=b, k=K_MAX)
  valid = (np.arange(K_MAX)[None, :] < np.arange(2, K_MAX + 1)[:, None]).astype(np.int32)
  batch["response_valid"] = valid
  batch["ranks"] = rng.integers(0, 3, size=(b, K_MAX)).astype(np.int32)  # many ties
  batch["ranks"][0] = [0, 1] + [5] * (K_MAX - 2)  # K = 2 with pads: one pair
  batch["weight"][-1] = 0.0
  batch = jax.tree.map(jnp.asarray, batch)

  rewards = np.asarray(jax.jit(lambda p, x: reward.response_rewards(model, p, x))(
      state.params, batch), np.float64)
  # Each response scored on its own [prompt | response] sequence.
  alone = jax.jit(reward.make_score_fn(model))(state.params, {
      "prompt_tokens": jnp.repeat(batch["prompt_tokens"], K_MAX, 0),
      "prompt_mask": jnp.repeat(batch["prompt_mask"], K_MAX, 0),
      "response_tokens": batch["response_tokens"].reshape(b * K_MAX, -1),
      "response_mask": batch["response_mask"].reshape(b * K_MAX, -1)})
  np.testing.assert_allclose(rewards.reshape(-1), np.asarray(alone), rtol=1e-5, atol=1e-5)
  # Gradients too: sharing the prompt's keys/values changes no parameter's gradient.
  full = lambda params: reward.make_score_fn(model)(params, {
      "prompt_tokens": jnp.repeat(batch["prompt_tokens"], K_MAX, 0),
      "prompt_mask": jnp.repeat(batch["prompt_mask"], K_MAX, 0),
      "response_tokens": batch["response_tokens"].reshape(b * K_MAX, -1),
      "response_mask": batch["response_mask"].reshape(b * K_MAX, -1)})
  shared = lambda params: reward.response_rewards(model, params, batch).reshape(-1)
  weights = jnp.asarray(rng.normal(size=b * K_MAX), jnp.float32)
  grads = jax.jit(lambda params: [jax.grad(lambda q: jnp.sum(weights * f(q)))(params)
                                  for f in (shared, full)])(state.params)
  for shared_grad, full_grad in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    np.testing.assert_allclose(shared_grad, full_grad, rtol=1e-5, atol=1e-5)

  loss_num = loss_den = pairs = correct = 0.0
  for i in range(b):
    ks = range(int(valid[i].sum()))
    ordered = [(w, l) for w, l in itertools.permutations(ks, 2)
               if batch["ranks"][i, w] < batch["ranks"][i, l]]
    if not ordered or batch["weight"][i] == 0:
      continue
    loss_num -= sum(_log_sigmoid(rewards[i, w] - rewards[i, l]) for w, l in ordered) / len(
        ordered)
    loss_den += 1
    pairs += len(ordered)
    correct += sum(rewards[i, w] > rewards[i, l] for w, l in ordered)
  sums = jax.jit(reward.make_rm_eval_step(model))(state.params, batch)
  got = reward.rm_eval_metrics(sums)
  assert got["eval/rm/pairs"] == pairs and got["eval/rm/prompts"] == loss_den
  np.testing.assert_allclose(got["eval/loss/rm"], loss_num / loss_den, rtol=1e-5)
  np.testing.assert_allclose(got["eval/rm/accuracy"], correct / pairs, rtol=1e-6)


def test_sharded_step_equals_single_device(model, single):
  state, step = single
  batch = ranking_batch(1)
  new_single, m_single = step(jax.tree.map(jnp.copy, state), batch, jax.random.key(0))
  mesh = fx.mesh_of((2, 2, 2))
  sharded_state, sharded_step, _ = fx.jitted_step(reward.make_rm_step, model, mesh, batch,
                                                  learning_rate=3e-2)
  new_sharded, m_sharded = sharded_step(sharded_state, batch, jax.random.key(0))
  for key in ("loss/rm", "rm/accuracy", "rm/margin", "optim/grad_norm"):
    np.testing.assert_allclose(float(m_sharded[key]), float(m_single[key]), rtol=1e-5,
                               atol=1e-5)
  assert fx.max_abs_diff(new_sharded.params, new_single.params) < 1e-5


def test_separable_comparisons_reach_95_percent_accuracy(model, single):
  state, step = single
  state = jax.tree.map(jnp.copy, state)
  losses = []
  for i in range(40):
    state, m = step(state, ranking_batch(100 + i, separable=True), jax.random.key(i))
    losses.append(float(m["loss/rm"]))
  assert np.mean(losses[-5:]) < np.mean(losses[:5])
  eval_step = jax.jit(reward.make_rm_eval_step(model))
  sums = [eval_step(state.params, ranking_batch(1000 + i, separable=True)) for i in range(4)]
  totals = jax.tree.map(lambda *x: sum(float(v) for v in x), *sums)
  accuracy = reward.rm_eval_metrics(totals)["eval/rm/accuracy"]
  assert accuracy >= 0.95, accuracy
  assert step._cache_size() == 1


def test_normalisation_gives_mean_zero_and_unit_std():
  rng = np.random.default_rng(0)
  h = rng.normal(3.0, 2.0, size=50)  # the head's raw output
  weights = np.ones(50)
  weights[-5:] = 0.0  # padding examples do not count
  gain, bias = 1.5, 0.25
  for with_gain in (False, True):
    new = reward.normalized_gain_bias(gain * h + bias, weights, gain, bias, with_gain)
    r = new["gain"] * h[:45] + new["bias"]
    assert abs(r.mean()) < 1e-9
    assert r.std() == pytest.approx(1.0 if with_gain else gain * h[:45].std())
    assert new["num_responses"] == 45
