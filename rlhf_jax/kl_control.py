"""KL coefficient controllers for PPO: fixed, or adaptive (Ziegler et al. 2019).

These run on the host between PPO iterations, in plain Python floats: beta is a
scalar that changes once per iteration, so it enters the jitted rollout and update
functions as a traced argument (changing it compiles nothing new) rather than as a
compile-time constant. The state is a small JSON-able dict, saved with each
checkpoint, so that a resumed run continues with exactly the beta it stopped with.
"""

import math
from typing import Any, Union

from rlhf_jax.errors import ConfigError


class FixedKLController:
  """beta never changes (Stiennon et al. 2020: 0.05; InstructGPT: 0.02)."""

  kind = "fixed"

  def __init__(self, beta: float):
    self._beta = float(beta)

  @property
  def value(self) -> float:
    return self._beta

  def update(self, current_kl: float, n_steps: int) -> float:
    """No-op, so the PPO loop can call `update` whatever the controller."""
    del current_kl, n_steps
    return self._beta

  def state_dict(self) -> dict[str, Any]:
    return {"kind": self.kind, "value": self._beta}

  def load_state_dict(self, state: dict[str, Any]) -> None:
    _check_kind(state, self.kind)
    self._beta = float(state["value"])


class AdaptiveKLController:
  """Proportional control of the policy's KL from the reference (Ziegler et al.).

  After each iteration with measured KL `current_kl` (nats per response, summed over
  its tokens) over `n_steps` episodes:

    e    = clip(current_kl / target - 1, -0.2, 0.2)
    beta = beta * (1 + e * n_steps / horizon)

  Raising beta when the KL overshoots the target and lowering it when it
  undershoots holds the KL near `target` without hand-tuning beta for every
  reward model; the clip bounds the change per episode so that a noisy KL estimate
  cannot swing beta. Ziegler et al.: beta0 0.15, target 6 nats, horizon 10,000.
  """

  kind = "adaptive"

  def __init__(self, init_beta: float = 0.15, target: float = 6.0,
               horizon: float = 10_000):
    if not target > 0:
      raise ValueError(f"KL target must be positive, got {target}")
    if not horizon > 0:
      raise ValueError(f"KL horizon must be positive, got {horizon}")
    self._beta = float(init_beta)
    self.target = float(target)
    self.horizon = float(horizon)

  @property
  def value(self) -> float:
    return self._beta

  def update(self, current_kl: float, n_steps: int) -> float:
    """Moves beta towards holding `current_kl` at the target; returns the new beta.

    `current_kl` may be a Python, numpy or 0-d jax scalar (it is converted with
    float()). A non-finite KL raises instead of silently making beta NaN, which
    would poison every later iteration and the checkpointed state.
    """
    kl = float(current_kl)
    if not math.isfinite(kl):
      raise ValueError(f"adaptive KL controller got a non-finite KL ({kl})")
    error = min(max(kl / self.target - 1.0, -0.2), 0.2)
    self._beta *= 1.0 + error * float(n_steps) / self.horizon
    return self._beta

  def state_dict(self) -> dict[str, Any]:
    # target and horizon are written for the record; they come from the config.
    return {"kind": self.kind, "value": self._beta, "target": self.target,
            "horizon": self.horizon}

  def load_state_dict(self, state: dict[str, Any]) -> None:
    _check_kind(state, self.kind)
    self._beta = float(state["value"])


KLController = Union[FixedKLController, AdaptiveKLController]


def _check_kind(state: dict[str, Any], kind: str) -> None:
  got = state.get("kind", kind)
  if got != kind:
    raise ConfigError(
        f"ppo.adaptive_kl: the checkpoint holds a {got} KL controller but the "
        f"config asks for a {kind} one; resume with the run's original config")


def make_kl_controller(ppo_cfg) -> KLController:
  """Builds the controller from `config.ppo`.

  Fields: `kl_coef` (beta, or beta0 when adaptive), `adaptive_kl` (bool), and when
  adaptive `kl_target` (nats per response) and `kl_horizon` (episodes).
  """
  beta = float(ppo_cfg.kl_coef)
  if not (math.isfinite(beta) and beta >= 0):
    raise ConfigError(f"ppo.kl_coef must be a finite number >= 0, got {beta}")
  if not ppo_cfg.adaptive_kl:
    return FixedKLController(beta)
  target, horizon = float(ppo_cfg.kl_target), float(ppo_cfg.kl_horizon)
  if not (math.isfinite(target) and target > 0):
    raise ConfigError(f"ppo.kl_target must be > 0, got {target}")
  if not (math.isfinite(horizon) and horizon > 0):
    raise ConfigError(f"ppo.kl_horizon must be > 0, got {horizon}")
  return AdaptiveKLController(beta, target, horizon)
