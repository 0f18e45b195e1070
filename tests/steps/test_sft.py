"""The SFT step: masks, sharded == single-device, accumulation, loss falls."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.models import heads
from rlhf_jax.steps import sft
from tests.steps import supervised_fixtures as fx


def demo_batch(seed: int) -> dict:
  rng = np.random.default_rng(seed)
  prompt_tokens, prompt_mask = fx.prompts(rng)
  response_tokens, response_mask = fx.responses(rng, (fx.B,))
  weight = np.ones(fx.B, np.float32)
  weight[-1] = 0.0  # a padding example: must not count
  return dict(prompt_tokens=prompt_tokens, prompt_mask=prompt_mask,
              response_tokens=response_tokens, response_mask=response_mask, weight=weight)


@pytest.fixture(scope="module")
def single():
  """The single-device step (built once: every test below reuses its compile)."""
  model = heads.PolicyModel(fx.model_config())
  state, step, _ = fx.jitted_step(sft.make_sft_step, model, fx.mesh_of((1, 1, 1)),
                                  demo_batch(0))
  return model, state, step


def test_target_mask_counts_response_and_optionally_prompt():
  prompt_mask = np.array([[0, 1, 1]])
  response_mask = np.array([[1, 1, 0]])
  # Targets are tokens 1..5 of [p p p r r r]; a target counts when it and the
  # token predicting it are real.
  np.testing.assert_array_equal(sft.target_mask(prompt_mask, response_mask),
                                [[0, 0, 1, 1, 0]])
  np.testing.assert_array_equal(sft.target_mask(prompt_mask, response_mask, True),
                                [[0, 1, 1, 1, 0]])


def test_loss_is_mean_nll_of_response_tokens_or_all_tokens(single):
  model, state, _ = single
  batch = jax.tree.map(jnp.asarray, demo_batch(0))
  tokens = jnp.concatenate([batch["prompt_tokens"], batch["response_tokens"]], 1)
  mask = jnp.concatenate([batch["prompt_mask"], batch["response_mask"]], 1)
  response_only, with_prompt, logits = jax.jit(lambda p, b: (
      sft.sft_nll_sum(model, p, b), sft.sft_nll_sum(model, p, b, include_prompt_loss=True),
      model.apply({"params": p}, tokens, mask)))(state.params, batch)
  # Reference: log-softmax over the whole sequence, picked by hand.
  logits = np.asarray(logits, np.float64)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  for (nll, count), first in ((response_only, fx.P), (with_prompt, 1)):
    total, n = 0.0, 0
    for b in range(fx.B - 1):  # the last example has weight 0
      for t in range(first, fx.P + fx.R):
        if mask[b, t] and mask[b, t - 1]:
          total -= logp[b, t - 1, tokens[b, t]]
          n += 1
    assert float(count) == n
    np.testing.assert_allclose(float(nll), total, rtol=1e-5)


def test_sharded_step_with_accumulation_equals_single_device(single):
  """One step on the 2x2x2 mesh, split into 2 micro-batches, equals one unsplit
  step on one device: same loss, same updated params (float32, 1e-5)."""
  model, state, step = single
  batch = demo_batch(1)
  new_single, m_single = step(jax.tree.map(jnp.copy, state), batch, jax.random.key(0))
  mesh = fx.mesh_of((2, 2, 2))
  sharded_state, sharded_step, shardings = fx.jitted_step(
      sft.make_sft_step, model, mesh, batch, accum_steps=2)
  assert fx.max_abs_diff(sharded_state.params, state.params) == 0.0
  new_sharded, m_sharded = sharded_step(sharded_state, batch, jax.random.key(0))
  for key in ("loss/sft", "sft/tokens", "optim/grad_norm"):
    np.testing.assert_allclose(float(m_sharded[key]), float(m_single[key]), rtol=1e-5,
                               atol=1e-5)
  assert fx.max_abs_diff(new_sharded.params, new_single.params) < 1e-5
  # The params really live in shards on the mesh.
  assert new_sharded.params["trunk"]["embed"]["embedding"].sharding == (
      shardings.params["trunk"]["embed"]["embedding"])


def test_loss_falls_on_fixture_data(single):
  """Memorising four fixed batches: the loss drops well below its start, with
  one compile for all steps."""
  _, state, step = single
  state = jax.tree.map(jnp.copy, state)
  batches = [demo_batch(10 + i) for i in range(4)]
  losses = []
  for i in range(40):
    state, m = step(state, batches[i % 4], jax.random.key(i))
    losses.append(float(m["loss/sft"]))
  assert np.mean(losses[-4:]) < 0.7 * np.mean(losses[:4])
  assert int(state.step) == 40 and int(state.bad_step) == -1
  assert step._cache_size() == 1  # no recompiles across steps


def test_best_response_of_comparisons_as_demonstrations():
  tokens = np.arange(2 * 3 * 2).reshape(2, 3, 2)
  batch = {"prompt_tokens": np.zeros((2, 1)), "response_tokens": tokens,
           "response_mask": np.ones_like(tokens), "ranks": np.array([[1, 0, 0], [0, 2, 1]]),
           "response_valid": np.array([[1, 1, 1], [0, 1, 1]]), "weight": np.ones(2)}
  out = sft.demonstrations_from_comparisons(batch)
  # Row 0: ranks tie at 0 -> the first of them (index 1); row 1: index 0 is padding.
  np.testing.assert_array_equal(out["response_tokens"], [tokens[0, 1], tokens[1, 2]])
  assert set(out) == {"prompt_tokens", "response_tokens", "response_mask", "weight"}
