"""PPO's update: epochs x minibatches of clipped policy and value steps, one jit.

`make_update` returns `update(state, batch, ptx, rng) -> (state, metrics)`, which
runs the whole optimisation phase of one PPO iteration on device:

  for epoch in range(ppo.epochs):                   # lax.scan
    shuffle the rollout batch (a fresh permutation per epoch from `rng`)
    for minibatch in range(ppo.minibatches):        # lax.scan
      for micro in range(optim.accum_steps):        # lax.scan, gradients averaged
        loss = policy_loss + vf_coef * value_loss - entropy_coef * entropy
               + gamma_ptx * LM loss on this micro-batch's pretraining text
      one optimizer step for the policy, one for the value network
      EMA of the policy weights (if ema_decay > 0)

The policy and the value network are separate param trees with separate optimizer
states (InstructGPT / Stiennon et al.: a separate critic initialised from the RM).
The loss is one sum and the two trees are disjoint, so one `jax.grad` gives both
gradients; each optimizer then clips and scales its own network's gradient, so a
large value-loss gradient early in training cannot shrink the policy's step through
a shared global-norm clip.

Gradient accumulation averages the micro-batches' gradients, each micro-batch loss
being its own token mean (as TRL / accelerate do); with accum_steps = 1 this is the
minibatch's token mean. PPO-ptx is inside the same step: the LM loss is one more
term of the policy's loss, so its gradient goes through the same optimizer step.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax

from rlhf_jax import losses, optim
from rlhf_jax.models import heads
from rlhf_jax.sharding import constrain
from rlhf_jax.steps import rollout as rollout_lib


class PPOState(flax.struct.PyTreeNode):
  """Everything the update changes. `ema` is None when ppo.ema_decay is 0."""
  step: jax.Array  # optimizer steps taken (each updates both networks)
  policy: Any
  value: Any
  policy_opt: Any
  value_opt: Any
  ema: Any = None


def init_state(policy_params, value_params, policy_tx: optax.GradientTransformation,
               value_tx: optax.GradientTransformation, ema_decay: float = 0.0) -> PPOState:
  """Fresh optimizer states; jit it so they are born with the params' shardings."""
  ema = jax.tree.map(jnp.copy, policy_params) if ema_decay > 0 else None
  return PPOState(step=jnp.zeros((), jnp.int32), policy=policy_params, value=value_params,
                  policy_opt=policy_tx.init(policy_params),
                  value_opt=value_tx.init(value_params), ema=ema)


def state_sharding(policy_tx: optax.GradientTransformation,
                   value_tx: optax.GradientTransformation, abstract_policy, abstract_value,
                   policy_sharding, value_sharding, replicated, ema: bool) -> PPOState:
  """A PPOState of shardings: each optimizer state laid out like its params
  (optim.opt_state_shardings), the EMA like the policy, the step replicated."""
  return PPOState(
      step=replicated, policy=policy_sharding, value=value_sharding,
      policy_opt=optim.opt_state_shardings(policy_tx, abstract_policy, policy_sharding,
                                           replicated),
      value_opt=optim.opt_state_shardings(value_tx, abstract_value, value_sharding,
                                          replicated),
      ema=policy_sharding if ema else None)


@dataclasses.dataclass(frozen=True)
class UpdateParams:
  """Static settings of the update (hashable; closed over by jit)."""
  epochs: int = 4
  minibatches: int = 1
  accum_steps: int = 1
  clip: float = 0.2
  value_clip: float = 0.2
  vf_coef: float = 0.1
  entropy_coef: float = 0.0
  gamma_ptx: float = 0.0
  ema_decay: float = 0.0
  temperature: float = 0.7  # the sampling temperature: ratios use the same logits

  @classmethod
  def from_config(cls, config) -> "UpdateParams":
    p = config.ppo
    return cls(epochs=int(p.epochs), minibatches=int(p.minibatches),
               accum_steps=int(config.optim.accum_steps), clip=float(p.clip),
               value_clip=float(p.value_clip), vf_coef=float(p.vf_coef),
               entropy_coef=float(p.entropy_coef), gamma_ptx=float(p.gamma_ptx),
               ema_decay=float(p.ema_decay),
               temperature=float(config.rollout.temperature))


def ptx_lm_loss(policy: heads.PolicyModel, params, tokens, mask):
  """Next-token cross-entropy on pretraining text (mean over real target tokens)."""
  logits = policy.apply({"params": params}, tokens, mask)
  loss, _ = losses.token_cross_entropy(logits[:, :-1], tokens[:, 1:], mask[:, 1:])
  return loss


def make_loss_fn(policy: heads.PolicyModel, value: heads.ValueModel, up: UpdateParams):
  """loss(policy_params, value_params, micro_batch, ptx) -> (loss, metrics).

  `micro_batch` holds rollout_lib.UPDATE_KEYS; `ptx` is {'tokens', 'mask'} or None
  (then, and when gamma_ptx is 0, no pretraining forward is run).
  """
  def loss_fn(policy_params, value_params, mb, ptx):
    mask = mb["response_mask"]
    logp, logits = rollout_lib.policy_logprobs(
        policy, policy_params, mb["prompt_tokens"], mb["prompt_mask"],
        mb["response_tokens"], mask, up.temperature)
    pg_loss, pg_metrics = losses.ppo_policy_loss(logp, mb["logprobs"], mb["advantages"],
                                                 mask, up.clip)
    entropy = losses.masked_mean(losses.entropy_from_logits(logits, up.temperature), mask)
    v = rollout_lib.response_values(value, value_params, mb["prompt_tokens"],
                                    mb["prompt_mask"], mb["response_tokens"], mask)
    vf_loss, vf_metrics = losses.ppo_value_loss(v, mb["values"], mb["returns"], mask,
                                                up.value_clip)
    loss = pg_loss + up.vf_coef * vf_loss
    if up.entropy_coef:
      loss = loss - up.entropy_coef * entropy
    metrics = {"loss/policy": pg_loss, "loss/value": vf_loss, "ppo/update_entropy": entropy,
               **pg_metrics, **vf_metrics}
    if up.gamma_ptx and ptx is not None:
      ptx_loss = ptx_lm_loss(policy, policy_params, ptx["tokens"], ptx["mask"])
      loss = loss + up.gamma_ptx * ptx_loss
      metrics["loss/ptx"] = ptx_loss
    metrics["loss/total"] = loss
    return loss, metrics
  return loss_fn


def make_grad_fn(policy: heads.PolicyModel, value: heads.ValueModel, up: UpdateParams):
  """grads(policy_params, value_params, micro_batch, ptx) -> ((g_policy, g_value), metrics)."""
  loss_fn = make_loss_fn(policy, value, up)
  grad = jax.grad(loss_fn, argnums=(0, 1), has_aux=True)
  return grad


def _split(x, leading: tuple[int, ...]):
  """[N, ...] -> [*leading, N / prod(leading), ...]."""
  return x.reshape(leading + (-1,) + x.shape[1:])


def _batch_constraint(tree):
  """Micro-batches stay split over the batch axes after shuffling and reshaping."""
  return jax.tree.map(lambda x: constrain(x, ("batch",) + (None,) * (x.ndim - 1)), tree)


def update(policy: heads.PolicyModel, value: heads.ValueModel,
           policy_tx: optax.GradientTransformation, value_tx: optax.GradientTransformation,
           state: PPOState, batch: dict[str, jax.Array], ptx: Optional[dict[str, jax.Array]],
           rng: jax.Array, *, up: UpdateParams):
  """One PPO iteration's optimisation phase (pure; see make_update).

  Args:
    batch: the rollout batch ([B, ...]; only rollout_lib.UPDATE_KEYS are read).
    ptx: pretraining text {'tokens', 'mask'}: [epochs, minibatches, N, T] with N
      divisible by accum_steps, or None.
    rng: the iteration's key; each epoch's permutation is folded from it.
  Returns:
    (new_state, metrics): metrics are means over all micro-batches, plus
    'ppo/grad_norm_policy' / 'ppo/grad_norm_value' (means over optimizer steps).
  """
  batch = {k: batch[k] for k in rollout_lib.UPDATE_KEYS}
  size = batch["response_tokens"].shape[0]
  m, a = up.minibatches, up.accum_steps
  if size % (m * a):
    raise ValueError(f"rollout batch {size} is not divisible by minibatches x "
                     f"accum_steps = {m} x {a}")
  grad_fn = make_grad_fn(policy, value, up)

  def minibatch_step(state: PPOState, xs):
    mb, mb_ptx = xs  # [A, micro, ...] and [A, N/A, T] or None

    def micro_step(acc, micro):
      micro_batch, micro_ptx = micro
      if micro_ptx is not None:
        micro_ptx = _batch_constraint(micro_ptx)
      (g_pol, g_val), metrics = grad_fn(state.policy, state.value,
                                        _batch_constraint(micro_batch), micro_ptx)
      acc = jax.tree.map(lambda s, g: s + g / a, acc, (g_pol, g_val))
      return acc, metrics

    zeros = jax.tree.map(jnp.zeros_like, (state.policy, state.value))
    (g_pol, g_val), metrics = jax.lax.scan(micro_step, zeros, (mb, mb_ptx))
    metrics = jax.tree.map(jnp.mean, metrics)
    metrics["ppo/grad_norm_policy"] = optax.tree.norm(g_pol)
    metrics["ppo/grad_norm_value"] = optax.tree.norm(g_val)
    upd_pol, policy_opt = policy_tx.update(g_pol, state.policy_opt, state.policy)
    upd_val, value_opt = value_tx.update(g_val, state.value_opt, state.value)
    new_policy = optax.apply_updates(state.policy, upd_pol)
    ema = state.ema
    if ema is not None:
      d = up.ema_decay
      ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, new_policy)
    state = state.replace(step=state.step + 1, policy=new_policy,
                          value=optax.apply_updates(state.value, upd_val),
                          policy_opt=policy_opt, value_opt=value_opt, ema=ema)
    return state, metrics

  def epoch_step(state: PPOState, xs):
    epoch, epoch_ptx = xs
    perm = jax.random.permutation(jax.random.fold_in(rng, epoch), size)
    shuffled = jax.tree.map(lambda x: _split(jnp.take(x, perm, axis=0), (m, a)), batch)
    if epoch_ptx is not None:  # [M, N, T] -> [M, A, N/A, T]
      epoch_ptx = jax.tree.map(lambda x: x.reshape((m, a, -1) + x.shape[2:]), epoch_ptx)
    return jax.lax.scan(minibatch_step, state, (shuffled, epoch_ptx))

  state, metrics = jax.lax.scan(epoch_step, state, (jnp.arange(up.epochs), ptx))
  return state, jax.tree.map(jnp.mean, metrics)


def make_update(policy: heads.PolicyModel, value: heads.ValueModel,
                policy_tx: optax.GradientTransformation,
                value_tx: optax.GradientTransformation, up: UpdateParams, *,
                state_sharding=None, batch_sharding=None, ptx_sharding=None,
                replicated=None):
  """`update` jitted at its one call site: explicit shardings, the state donated.

  Args:
    state_sharding: a PPOState of shardings (e.g. `jax.tree.map(lambda x:
      x.sharding, state)` of a state created by a jitted `init_state`).
    batch_sharding: a NamedSharding splitting the leading axis of the rollout
      batch over the batch mesh axes (any rank).
    replicated: a NamedSharding for the rng and the metrics.
    ptx_sharding: for the pretraining batch [E, M, N, T], split over N (see
      `ptx_sharding_for`); unused when the update takes no ptx batch.
  Without shardings the function follows its inputs' shardings (tests, one device).
  """
  fn = functools.partial(update, policy, value, policy_tx, value_tx, up=up)
  if state_sharding is None:
    return jax.jit(fn, donate_argnums=(0,))
  return jax.jit(fn, in_shardings=(state_sharding, batch_sharding, ptx_sharding, replicated),
                 out_shardings=(state_sharding, replicated), donate_argnums=(0,))


def ptx_sharding_for(mesh) -> jax.sharding.NamedSharding:
  """[E, M, N, T] pretraining batches: N split over the batch axes."""
  return jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(None, None, ("data", "fsdp")))
