"""The optimizer, the train state, and the gradient plumbing every stage shares.

  make_optimizer      optax AdamW (eps 1e-5 by default) behind global-norm clipping,
                      with warmup then constant / linear / cosine decay
  TrainState          step, params, opt_state, rng, and the first non-finite step
  accumulate_gradients  gradients of a batch as a `lax.scan` over micro-batches
  apply_gradients     one optimizer update that refuses non-finite losses/gradients
  opt_state_shardings shardings of the optimizer state, derived from the params'

Gradient accumulation is done inside the jitted step (not with optax.MultiSteps)
so that one call of a step is one optimizer update on one global batch: the
schedule, the logged step and the checkpoint all count optimizer updates, and a
step with `accum_steps = A` computes exactly the gradient of the whole batch
(each micro-batch's loss is its *sum* divided by the whole batch's normaliser),
only with 1/A of the activation memory.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from rlhf_jax.errors import UserError

# Codes for TrainState.bad_metric; the trainer turns them into metric names.
FINITE, BAD_LOSS, BAD_GRAD = 0, 1, 2


class NonFiniteError(UserError):
  """A loss or gradient was NaN/inf: the run stops, the last good checkpoint stays."""


class TrainState(flax.struct.PyTreeNode):
  """Everything a training step reads and writes; one pytree, checkpointed whole.

  Attributes:
    step: optimizer updates done so far (int32 scalar).
    params: the model's parameter tree.
    opt_state: the optax state of `params`.
    rng: the run's PRNG key (typed). Steps derive per-step keys from it.
    bad_step: the first step whose loss or gradient norm was not finite, -1 if
      none. Checked on the host only at log and checkpoint steps, so the hot loop
      never waits on the device; updates after it are skipped (see
      `apply_gradients`), so the params stay the last good ones.
    bad_metric: BAD_LOSS or BAD_GRAD for `bad_step` (FINITE when none).
  """
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  bad_step: jax.Array
  bad_metric: jax.Array

  @classmethod
  def create(cls, params, tx: optax.GradientTransformation, rng: jax.Array) -> "TrainState":
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
               rng=rng, bad_step=jnp.full((), -1, jnp.int32),
               bad_metric=jnp.zeros((), jnp.int32))


# --------------------------------------------------------------------------------
# Schedule and optimizer
# --------------------------------------------------------------------------------


def make_schedule(optim_config, total_steps: int) -> Callable[[jax.Array], jax.Array]:
  """Learning rate at update `count` (0-based): linear warmup from 0, then decay.

  Decay runs from the end of warmup to `total_steps`, down to
  `learning_rate * end_lr_fraction`, linearly or along a half cosine; 'constant'
  stays at the peak. Like optax's schedules the first warmup update has lr 0.
  """
  peak = float(optim_config.learning_rate)
  warmup = int(optim_config.warmup_steps)
  end = peak * float(optim_config.end_lr_fraction)
  kind = optim_config.schedule
  decay_steps = max(int(total_steps) - warmup, 1)

  def schedule(count):
    count = jnp.asarray(count, jnp.float32)
    warm = peak * count / warmup if warmup > 0 else peak
    progress = jnp.clip((count - warmup) / decay_steps, 0.0, 1.0)
    if kind == "constant":
      decayed = jnp.asarray(peak, jnp.float32)
    elif kind == "linear":
      decayed = peak + (end - peak) * progress
    elif kind == "cosine":
      decayed = end + (peak - end) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
    else:
      raise ValueError(f"unknown schedule {kind!r}")
    return jnp.where(count < warmup, warm, decayed)

  return schedule


def decay_mask(params) -> Any:
  """Weight decay on matrices only: biases, norm scales and the RM's gain/bias
  are left alone (decaying them pulls the model towards a fixed offset, not
  towards simplicity)."""
  return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(optim_config, total_steps: int
                   ) -> tuple[optax.GradientTransformation, Callable]:
  """(tx, schedule): clip by global norm, then AdamW with the schedule.

  Adam's eps defaults to 1e-5 (config.optim.eps), the value of the original
  RLHF code, instead of optax's 1e-8: with tiny second moments (rarely used
  embeddings) a 1e-8 eps turns noise into full-size updates.
  """
  schedule = make_schedule(optim_config, total_steps)
  parts = []
  if optim_config.grad_clip_norm and optim_config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(float(optim_config.grad_clip_norm)))
  parts.append(optax.adamw(schedule, b1=float(optim_config.b1), b2=float(optim_config.b2),
                           eps=float(optim_config.eps),
                           weight_decay=float(optim_config.weight_decay), mask=decay_mask))
  return optax.chain(*parts), schedule


def opt_state_shardings(tx: optax.GradientTransformation, abstract_params, param_shardings,
                        replicated) -> Any:
  """The optimizer state laid out like the params it mirrors (Adam's mu and nu
  shard exactly as their parameter); scalars such as the step count replicate."""
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  return optax.tree_map_params(tx, lambda _, s: s, abstract_opt, param_shardings,
                               transform_non_params=lambda _: replicated)


# --------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------


def split_microbatches(batch: dict, accum_steps: int) -> dict:
  """[B, ...] -> [A, B/A, ...], micro-batch a = examples a, a + A, a + 2A, ...

  Strided, not contiguous: the batch is sharded in contiguous blocks over the
  data axes, and a strided split keeps every micro-batch spread over all
  devices in the same way, so the reshape moves no data between devices.
  """
  def split(x):
    b = x.shape[0]
    return x.reshape((b // accum_steps, accum_steps) + x.shape[1:]).swapaxes(0, 1)
  return jax.tree.map(split, batch)


def accumulate_gradients(loss_fn: Callable, params, batch: dict, rng: jax.Array,
                         accum_steps: int = 1):
  """Sum of `loss_fn`'s values, aux and gradients over `accum_steps` micro-batches.

  `loss_fn(params, micro_batch, rng) -> (loss, aux)` must return the micro-batch's
  contribution to the whole batch's loss (its sum over examples or tokens divided
  by the whole batch's normaliser) and aux values that are sums, so that adding
  the micro-batches' results gives exactly the full-batch loss, aux and gradient.
  Returns (loss, aux, grads).
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if accum_steps == 1:
    (loss, aux), grads = grad_fn(params, batch, rng)
    return loss, aux, grads
  micro = split_microbatches(batch, accum_steps)

  def body(carry, xs):
    index, micro_batch = xs
    (loss, aux), grads = grad_fn(params, micro_batch, jax.random.fold_in(rng, index))
    return jax.tree.map(jnp.add, carry, (loss, aux, grads)), None

  first = jax.tree.map(lambda x: x[0], micro)
  zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, params, first, rng))
  (loss, aux), grads = zeros
  (loss, aux, grads), _ = jax.lax.scan(body, (loss, aux, grads),
                                       (jnp.arange(accum_steps), micro))
  return loss, aux, grads


def apply_gradients(state: TrainState, grads, loss: jax.Array,
                    tx: optax.GradientTransformation, schedule: Callable
                    ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer update, skipped when the loss or the gradient is not finite.

  A non-finite update would poison the params and the Adam moments for good; we
  keep the old ones and record the step in `bad_step`, which the trainer checks
  at its next log or checkpoint step and then stops with a message naming it.
  Metrics: 'optim/grad_norm' (before clipping), 'optim/learning_rate'.
  """
  grad_norm = optax.tree.norm(grads)
  loss_ok = jnp.isfinite(loss)
  ok = loss_ok & jnp.isfinite(grad_norm)
  updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
  first_bad = (state.bad_step < 0) & ~ok
  new_state = state.replace(
      step=state.step + 1,
      params=keep(new_params, state.params),
      opt_state=keep(new_opt_state, state.opt_state),
      bad_step=jnp.where(first_bad, state.step + 1, state.bad_step),
      bad_metric=jnp.where(first_bad, jnp.where(loss_ok, BAD_GRAD, BAD_LOSS),
                           state.bad_metric))
  metrics = {"optim/grad_norm": grad_norm,
             "optim/learning_rate": schedule(state.step)}
  return new_state, metrics
