"""rlhf_jax.optim: schedules, AdamW settings, accumulation, non-finite updates."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from rlhf_jax import config_base, optim, sharding


def _optim_config(**overrides):
  c = config_base.base_config().optim
  for k, v in overrides.items():
    c[k] = v
  return c


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
def test_schedule_warmup_then_decay(kind):
  c = _optim_config(learning_rate=1.0, warmup_steps=4, schedule=kind, end_lr_fraction=0.1)
  schedule = optim.make_schedule(c, total_steps=14)
  lrs = np.array([float(schedule(i)) for i in range(16)])
  np.testing.assert_allclose(lrs[:5], [0, 0.25, 0.5, 0.75, 1.0], atol=1e-6)
  progress = np.clip((np.arange(16) - 4) / 10, 0, 1)
  expected = {"constant": np.ones(16),
              "linear": 1 - 0.9 * progress,
              "cosine": 0.1 + 0.9 * 0.5 * (1 + np.cos(math.pi * progress))}[kind]
  np.testing.assert_allclose(lrs[4:], expected[4:], atol=1e-6)
  if kind != "constant":
    assert lrs[14] == pytest.approx(0.1) and lrs[15] == pytest.approx(0.1)


def _first_update(grad_value, **overrides):
  c = _optim_config(learning_rate=0.1, schedule="constant", **overrides)
  tx, _ = optim.make_optimizer(c, 10)
  params = {"w": jnp.zeros((2, 2))}
  updates, _ = tx.update({"w": jnp.full((2, 2), grad_value)}, tx.init(params), params)
  return float(updates["w"][0, 0])


def test_adamw_uses_config_eps():
  assert config_base.base_config().optim.eps == 1e-5  # the original RLHF code's
  # Adam's first update is -lr * g / (|g| + eps): with g = eps it is half size.
  assert _first_update(1e-5) == pytest.approx(-0.05, rel=1e-3)


def test_global_norm_clipping_before_adam():
  # Gradient norm 200 is clipped to 1 (entries 0.5); with eps = 1 Adam's first
  # update then shows the clipped size: -lr * 0.5 / 1.5.
  assert _first_update(100.0, eps=1.0) == pytest.approx(-0.1 / 3, rel=1e-4)
  assert _first_update(100.0, eps=1.0, grad_clip_norm=0.0) == pytest.approx(
      -0.1 * 100 / 101, rel=1e-4)


def test_weight_decay_only_on_matrices():
  mask = optim.decay_mask({"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3),
                           "gain": jnp.ones(())})
  assert mask == {"kernel": True, "bias": False, "gain": False}


def _quadratic_loss(params, batch, rng):
  """Per-example squared error; its sum divided by the whole batch's size."""
  err = batch["x"] @ params["w"] - batch["y"]
  return jnp.sum(err ** 2) / 8.0, {"n": jnp.asarray(batch["x"].shape[0], jnp.float32)}


def test_accumulated_gradients_equal_full_batch():
  rng = np.random.default_rng(0)
  batch = {"x": jnp.asarray(rng.normal(size=(8, 3)), jnp.float32),
           "y": jnp.asarray(rng.normal(size=(8,)), jnp.float32)}
  params = {"w": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}
  key = jax.random.key(0)
  full = optim.accumulate_gradients(_quadratic_loss, params, batch, key, 1)
  accum = jax.jit(lambda p, b: optim.accumulate_gradients(_quadratic_loss, p, b, key, 4))(
      params, batch)
  for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(accum)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
  assert float(accum[1]["n"]) == 8.0


def test_microbatches_are_strided():
  split = optim.split_microbatches({"x": jnp.arange(8)}, 2)["x"]
  np.testing.assert_array_equal(np.asarray(split), [[0, 2, 4, 6], [1, 3, 5, 7]])


def test_non_finite_update_is_skipped_and_recorded():
  tx, schedule = optim.make_optimizer(_optim_config(), 10)
  state = optim.TrainState.create({"w": jnp.ones(3)}, tx, jax.random.key(0))
  good = {"w": jnp.ones(3)}
  state, metrics = optim.apply_gradients(state, good, jnp.float32(1.0), tx, schedule)
  assert int(state.bad_step) == -1 and int(state.step) == 1
  params_before = state.params
  state, _ = optim.apply_gradients(state, {"w": jnp.array([1.0, jnp.nan, 1.0])},
                                   jnp.float32(1.0), tx, schedule)
  assert int(state.bad_step) == 2 and int(state.bad_metric) == optim.BAD_GRAD
  np.testing.assert_array_equal(np.asarray(state.params["w"]),
                                np.asarray(params_before["w"]))
  # A later bad loss does not overwrite the first bad step.
  state, _ = optim.apply_gradients(state, good, jnp.float32(jnp.inf), tx, schedule)
  assert int(state.bad_step) == 2 and int(state.step) == 3


def test_opt_state_shardings_mirror_params():
  mesh = sharding.make_mesh(config_base.base_config().mesh)
  params = {"w": jax.ShapeDtypeStruct((8, 4), jnp.float32),
            "b": jax.ShapeDtypeStruct((4,), jnp.float32)}
  param_sh = {"w": NamedSharding(mesh, P("data")), "b": NamedSharding(mesh, P())}
  tx, _ = optim.make_optimizer(_optim_config(weight_decay=0.1), 10)
  shardings = optim.opt_state_shardings(tx, params, param_sh, sharding.replicated(mesh))
  adam = [s for s in jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, tuple)
                                     and hasattr(x, "mu"))
          if hasattr(s, "mu")][0]
  assert adam.mu == param_sh and adam.nu == param_sh
  assert adam.count == sharding.replicated(mesh)
  # The structure matches the real optimizer state, so jit accepts it.
  state = jax.jit(tx.init, out_shardings=shardings)(
      {"w": jnp.ones((8, 4)), "b": jnp.ones(4)})
  assert jax.tree.structure(state) == jax.tree.structure(
      shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
