"""The PPO update: sharded equals single-device, PPO-ptx's gradient, and a toy task."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from rlhf_jax import kl_control, optim, sampling, sharding
from rlhf_jax.steps import ppo
from rlhf_jax.steps import rollout as rollout_lib
from tests.steps.ppo_fixtures import STOP, init_params, prompts, tiny_models, tiny_params

P, R, T = 5, 6, 8


def _rollout_batch(batch: int, seed: int = 0) -> dict:
  """A synthetic rollout batch (prefix masks, plausible log-probs): no compile."""
  rng = np.random.default_rng(seed)
  pt, pm = prompts(batch, P, seed=seed)
  lengths = rng.integers(1, R + 1, size=batch)
  mask = (np.arange(R)[None] < lengths[:, None]).astype(np.int32)
  tokens = rng.integers(4, 32, size=(batch, R)) * mask
  f = lambda *shape: rng.normal(size=shape).astype(np.float32)
  return {"prompt_tokens": pt, "prompt_mask": pm,
          "response_tokens": jnp.asarray(tokens, jnp.int32), "response_mask": jnp.asarray(mask),
          "logprobs": jnp.asarray((-3.5 + 0.3 * f(batch, R)) * mask),
          "values": jnp.asarray(f(batch, R) * mask),
          "advantages": jnp.asarray(f(batch, R) * mask),
          "returns": jnp.asarray(f(batch, R) * mask)}


def _ptx_batch(shape: tuple[int, ...], seed: int = 1) -> dict:
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, 32, size=shape + (T,))
  mask = np.ones(shape + (T,), np.int32)
  mask[..., :2] = 0  # some left padding
  return {"tokens": jnp.asarray(tokens * mask, jnp.int32), "mask": jnp.asarray(mask)}


def _optim_config(**kw):
  c = ml_collections.ConfigDict(dict(learning_rate=3e-3, schedule="cosine", warmup_steps=1,
                                     end_lr_fraction=0.1, b1=0.9, b2=0.999, eps=1e-5,
                                     weight_decay=0.01, grad_clip_norm=1.0))
  c.update(kw)
  return c


def test_sharded_update_equals_single_device():
  """One whole update (2 epochs x 2 minibatches x 2 accumulation steps, with
  entropy bonus, PPO-ptx and EMA) on a 2x2x2 mesh equals the one-device update."""
  models = tiny_models()
  params = tiny_params(models)
  up = ppo.UpdateParams(epochs=2, minibatches=2, accum_steps=2, entropy_coef=0.01,
                        gamma_ptx=2.0, ema_decay=0.9, temperature=0.7)
  tx, _ = optim.make_optimizer(_optim_config(), total_steps=4)
  batch = _rollout_batch(16)
  ptx = _ptx_batch((2, 2, 8))
  rng = jax.random.key(7)

  # One device.
  device = jax.devices()[0]
  put = lambda tree: jax.device_put(tree, device)
  state = jax.jit(lambda p, v: ppo.init_state(p, v, tx, tx, up.ema_decay))(
      put(params["policy"]), put(params["value"]))
  single_state, single_metrics = ppo.make_update(models.policy, models.value, tx, tx, up)(
      state, put(batch), put(ptx), rng)
  single_state, single_metrics = jax.device_get((single_state, single_metrics))

  # A 2x2x2 ('data', 'fsdp', 'tensor') mesh, params sharded by their annotations.
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2)))
  replicated = sharding.replicated(mesh)
  abstract, shardings = {}, {}
  for name, model in (("policy", models.policy), ("value", models.value)):
    boxed = jax.eval_shape(lambda m=model: m.init(jax.random.key(0),
                                                  jnp.ones((1, 4), jnp.int32))["params"])
    shardings[name] = sharding.logical_to_shardings(boxed, mesh)
    abstract[name] = jax.tree.map(lambda x: x.value if hasattr(x, "value") else x, boxed,
                                  is_leaf=lambda x: hasattr(x, "value"))
  assert any(s.spec != jax.sharding.PartitionSpec() and any(a is not None for a in s.spec)
             for s in jax.tree.leaves(shardings["policy"]))
  state_sh = ppo.state_sharding(tx, tx, abstract["policy"], abstract["value"],
                                shardings["policy"], shardings["value"], replicated, True)
  batch_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
  with jax.set_mesh(mesh):
    state = jax.jit(lambda p, v: ppo.init_state(p, v, tx, tx, up.ema_decay),
                    in_shardings=(shardings["policy"], shardings["value"]),
                    out_shardings=state_sh)(params["policy"], params["value"])
    update = ppo.make_update(models.policy, models.value, tx, tx, up, state_sharding=state_sh,
                             batch_sharding=batch_sh, ptx_sharding=ppo.ptx_sharding_for(mesh),
                             replicated=replicated)
    sharded_state, sharded_metrics = update(state, jax.device_put(batch, batch_sh),
                                            jax.device_put(ptx, ppo.ptx_sharding_for(mesh)),
                                            rng)
  assert sharded_state.policy["trunk"]["embed"]["embedding"].sharding.spec == \
      state_sh.policy["trunk"]["embed"]["embedding"].spec
  sharded_state, sharded_metrics = jax.device_get((sharded_state, sharded_metrics))

  assert int(single_state.step) == int(sharded_state.step) == 4
  chex_close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-5)
  jax.tree.map(chex_close, sharded_state, single_state)
  jax.tree.map(chex_close, sharded_metrics, single_metrics)
  # The update did something: params moved, EMA lags behind the policy.
  moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), single_state.policy,
                       jax.device_get(params["policy"]))
  assert max(jax.tree.leaves(moved)) > 1e-3
  assert single_metrics["ppo/clipfrac"] > 0 and np.isfinite(single_metrics["loss/ptx"])


def test_ptx_gradient_is_ppo_gradient_plus_gamma_times_lm_gradient():
  """With plain SGD (lr 1) one update moves the policy by exactly
  -(g_ppo + gamma_ptx * g_lm), each gradient computed on its own."""
  gamma = 3.0
  models = tiny_models()
  params = tiny_params(models)
  batch = _rollout_batch(8, seed=3)
  ptx = _ptx_batch((1, 1, 4), seed=4)
  up = ppo.UpdateParams(epochs=1, minibatches=1, accum_steps=1, gamma_ptx=gamma,
                        temperature=0.7)
  sgd = optax.sgd(1.0)
  state = ppo.init_state(*jax.tree.map(jnp.copy, (params["policy"], params["value"])),
                         sgd, sgd)  # copies: the update donates its state
  new, metrics = ppo.make_update(models.policy, models.value, sgd, sgd, up)(
      state, batch, ptx, jax.random.key(0))

  # The PPO gradient alone (gamma_ptx = 0) and the LM gradient alone. One
  # minibatch of the whole batch: the epoch's shuffle does not change the means.
  no_ptx = ppo.make_grad_fn(models.policy, models.value,
                            ppo.UpdateParams(temperature=0.7, gamma_ptx=0.0))
  lm_grad = jax.grad(lambda p, t, m: ppo.ptx_lm_loss(models.policy, p, t, m))

  @jax.jit
  def separate_grads(policy, value, batch, ptx):
    (g_ppo, g_value), _ = no_ptx(policy, value, batch, None)
    return g_ppo, g_value, lm_grad(policy, ptx["tokens"][0, 0], ptx["mask"][0, 0])
  g_ppo, g_value, g_lm = separate_grads(params["policy"], params["value"], batch, ptx)

  expect = jax.tree.map(lambda p, a, b: p - (a + gamma * b), params["policy"], g_ppo, g_lm)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               new.policy, expect)
  # The value network never sees the pretraining loss.
  expect_v = jax.tree.map(lambda p, g: p - g, params["value"], g_value)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               new.value, expect_v)
  # And the LM term is large enough here for the check to mean something.
  lm_norm = optax.tree.norm(g_lm) * gamma
  assert lm_norm > 0.1 * optax.tree.norm(g_ppo)
  assert float(metrics["loss/ptx"]) > 0


# ------------------------------------------------------------------ toy task

TOY_VOCAB, TOY_TOKEN = 8, 5


def count_token(_pt, _pm, response, mask):
  """Known reward: how many times TOY_TOKEN appears in the response."""
  return jnp.sum((response == TOY_TOKEN) & (mask > 0), axis=-1).astype(jnp.float32)


def test_toy_task_reward_rises_while_adaptive_kl_holds_target():
  """PPO with a programmatic reward (count of one token, -1 without a stop token)
  and the adaptive KL controller: the reward rises far above the initial policy's,
  and the KL from the initial (reference) policy settles near the target, held
  there by beta. 80 iterations of 32 episodes take ~3 s after compilation."""
  models = tiny_models(vocab_size=TOY_VOCAB)._replace(reward=None)
  policy0 = init_params(models.policy, 0, std=0.3)
  value0 = init_params(models.value, 1, std=0.1)
  params = {"policy": policy0, "reference": policy0, "value": value0}
  batch_size, target = 32, 3.0
  sp = sampling.SamplingParams(new_tokens=8, stop_token=STOP, temperature=1.0)
  scoring = rollout_lib.ScoringParams(stop_token=STOP, temperature=1.0,
                                      missing_eos_penalty=-1.0)
  fns = rollout_lib.make_rollout_fns(models, sp, scoring, reward_fn=count_token)
  up = ppo.UpdateParams(epochs=4, minibatches=2, temperature=1.0)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3, eps=1e-5))
  # Copies: the update donates its state, and the reference must survive it.
  state = ppo.init_state(*jax.tree.map(jnp.copy, (policy0, value0)), tx, tx)
  update = ppo.make_update(models.policy, models.value, tx, tx, up)
  # A short horizon (100 episodes) so that beta can move within 80 iterations.
  ctl = kl_control.AdaptiveKLController(0.3, target=target, horizon=100)
  pt, pm = prompts(batch_size, 4, seed=0)
  pt = pt % TOY_VOCAB + (pt % TOY_VOCAB == 0) * 4  # ids within the toy vocabulary

  history = []
  for it in range(80):
    rng = jax.random.fold_in(jax.random.key(0), it)
    params.update(policy=state.policy, value=state.value)
    samples = fns.generate(state.policy, pt, pm, rng)
    batch, metrics = fns.score(params, pt, pm, samples, np.float32(ctl.value))
    state, _ = update(state, batch, None, jax.random.fold_in(rng, 1))
    metrics = jax.device_get(metrics)
    ctl.update(float(metrics["ppo/kl"]), batch_size)
    history.append((float(metrics["ppo/score"]), float(metrics["ppo/kl"]), ctl.value))

  scores, kls, betas = map(np.array, zip(*history))
  # The first rollout is the reference policy itself: the sampler's log-probs and
  # the reference's teacher-forced ones differ only by float rounding.
  assert abs(kls[0]) < 1e-5
  # Measured: score -0.81 at the start, ~1.7 over the last 20 iterations.
  assert scores[-20:].mean() > scores[0] + 1.5, scores
  # Measured: KL ~3.1 over the last 20 iterations (it overshoots to ~7 first).
  assert 0.6 * target < kls[-20:].mean() < 1.5 * target, kls
  assert kls.max() > target and betas.max() > betas[0]  # the controller had work to do
