"""KL controllers against the Ziegler et al. update written out by hand."""

import json

import ml_collections
import numpy as np
import pytest

from rlhf_jax import kl_control
from rlhf_jax.errors import ConfigError


def _ziegler_reference(beta, target, horizon, kls, ns):
  out = []
  for kl, n in zip(kls, ns):
    e = np.clip(float(kl) / target - 1.0, -0.2, 0.2)  # in float64
    beta = beta * (1.0 + e * n / horizon)
    out.append(beta)
  return out


def test_adaptive_controller_follows_a_sequence_of_updates():
  # Below, at, above the target, and far outside the +-20% clip both ways.
  kls = [0.0, 3.0, 6.0, 6.6, 7.5, 100.0, -5.0, 5.4, np.float32(6.3)]
  ns = [64, 64, 512, 64, 1, 512, 64, 1000, 64]
  ctl = kl_control.AdaptiveKLController(0.15, 6.0, 10_000)
  assert ctl.value == 0.15
  got = [ctl.update(kl, n) for kl, n in zip(kls, ns)]
  ref = _ziegler_reference(0.15, 6.0, 10_000, kls, ns)
  np.testing.assert_allclose(got, ref, rtol=1e-12)
  assert ctl.value == got[-1]
  # Spot checks of the clip, by hand: KL 100 -> e = +0.2; KL 0 -> e = -0.2.
  one = kl_control.AdaptiveKLController(1.0, 6.0, 100)
  assert one.update(100.0, 10) == pytest.approx(1.0 * (1 + 0.2 * 10 / 100))
  assert one.update(0.0, 10) == pytest.approx(1.02 * (1 - 0.2 * 10 / 100))
  assert type(one.value) is float


def test_adaptive_controller_rejects_non_finite_kl():
  ctl = kl_control.AdaptiveKLController(0.1, 6.0, 10_000)
  with pytest.raises(ValueError):
    ctl.update(float("nan"), 8)
  assert ctl.value == 0.1


def test_fixed_controller_never_moves():
  ctl = kl_control.FixedKLController(0.05)
  for kl in (0.0, 100.0, 6.0):
    assert ctl.update(kl, 512) == 0.05
  assert ctl.value == 0.05


def test_state_round_trips_through_json_and_resumes_exactly():
  a = kl_control.AdaptiveKLController(0.15, 6.0, 10_000)
  for kl in (8.0, 9.0, 4.0):
    a.update(kl, 64)
  state = json.loads(json.dumps(a.state_dict()))
  b = kl_control.AdaptiveKLController(0.15, 6.0, 10_000)
  b.load_state_dict(state)
  assert b.value == a.value
  assert a.update(7.0, 64) == b.update(7.0, 64)

  f = kl_control.FixedKLController(0.02)
  g = kl_control.FixedKLController(0.5)
  g.load_state_dict(json.loads(json.dumps(f.state_dict())))
  assert g.value == 0.02
  with pytest.raises(ConfigError):
    g.load_state_dict(a.state_dict())


def _ppo_cfg(**kw):
  d = dict(kl_coef=0.15, adaptive_kl=True, kl_target=6.0, kl_horizon=10_000)
  d.update(kw)
  return ml_collections.ConfigDict(d)


def test_make_kl_controller_from_config():
  ctl = kl_control.make_kl_controller(_ppo_cfg())
  assert isinstance(ctl, kl_control.AdaptiveKLController)
  assert (ctl.value, ctl.target, ctl.horizon) == (0.15, 6.0, 10_000)
  fixed = kl_control.make_kl_controller(_ppo_cfg(kl_coef=0.02, adaptive_kl=False))
  assert isinstance(fixed, kl_control.FixedKLController) and fixed.value == 0.02
  for bad in (dict(kl_coef=-1.0), dict(kl_target=0.0), dict(kl_horizon=-5)):
    with pytest.raises(ConfigError):
      kl_control.make_kl_controller(_ppo_cfg(**bad))
