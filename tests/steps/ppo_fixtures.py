"""Tiny PPO set-ups shared by the rollout, update and evaluation tests.

One-layer models keep each compile to a few seconds on a shared 2-core CPU; every
test module builds its jitted functions once (module-scoped fixtures).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.models import heads
from rlhf_jax.steps import rollout as rollout_lib
from tests.models.model_fixtures import tiny_config

VOCAB = 32
STOP = 3
PAD = 0


def tiny_models(**overrides) -> rollout_lib.Models:
  base = dict(vocab_size=VOCAB, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=32,
              max_len=32)
  cfg = tiny_config("gpt2", **{**base, **overrides})
  return rollout_lib.Models(heads.PolicyModel(cfg), heads.ValueModel(cfg),
                            heads.RewardModel(cfg))


def init_params(model, seed: int, std: float = 0.1):
  """Random params in numpy from the model's abstract init: no XLA compile.

  Eagerly running `model.init` dispatches (and compiles) each op separately, which
  costs seconds per model on a loaded CPU; the tests only need some random model.
  Norm scales and `gain` are 1, biases 0, every other weight normal(0, std): a
  larger std than the real init so the tiny policy is far from uniform.
  """
  shapes = nn.meta.unbox(jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))["params"]))
  rng = np.random.default_rng(seed)

  def fill(path, x):
    name = path[-1].key
    if name in ("scale", "gain"):
      return jnp.ones(x.shape, x.dtype)
    if name == "bias":
      return jnp.zeros(x.shape, x.dtype)
    return jnp.asarray(rng.normal(0.0, std, x.shape), x.dtype)
  return jax.tree_util.tree_map_with_path(fill, shapes)


def tiny_params(models: rollout_lib.Models) -> dict:
  """Policy and reference differ (non-zero KL); the critic is a copy of the RM."""
  reward = init_params(models.reward, 2)
  return {"policy": init_params(models.policy, 0),
          "reference": init_params(models.policy, 1),
          "value": jax.tree.map(jnp.copy, reward), "reward": reward}


def prompts(batch: int, length: int, seed: int = 0):
  """Left-padded prompts of mixed lengths with no stop or pad tokens inside."""
  rng = np.random.default_rng(seed)
  real = rng.integers(1, length + 1, size=batch)
  real[0] = length
  tokens = rng.integers(4, VOCAB, size=(batch, length))
  mask = (np.arange(length)[None, :] >= (length - real)[:, None]).astype(np.int32)
  return jnp.asarray(tokens * mask, jnp.int32), jnp.asarray(mask)
