"""Tiny models, batches and jitted steps shared by the SFT and RM step tests.

Every jitted step here is built the way the trainer builds it (TrainState created
in its shardings, one jax.jit with in/out shardings and donation), on either one
device or the 2x2x2 mesh of conftest's eight CPU devices. Shapes are fixed per
test module so each step compiles once.
"""
import jax
import ml_collections
import numpy as np

from rlhf_jax import config_base, optim, sharding
from rlhf_jax.trainers import common
from tests.models.model_fixtures import tiny_config

VOCAB = 64
B, P, R = 8, 6, 5


def model_config():
  return tiny_config("gpt2", vocab_size=VOCAB, d_model=16, n_layers=1, n_heads=2,
                     n_kv_heads=2, d_ff=32, max_len=16)


def mesh_of(shape):
  """(1,1,1) -> one device; (2,2,2) -> all eight CPU devices."""
  c = ml_collections.ConfigDict(dict(zip(sharding.MESH_AXES, shape)))
  n = int(np.prod(shape))
  return sharding.make_mesh(c, devices=jax.devices()[:n])


def optim_config(learning_rate=1e-2, **overrides):
  c = config_base.base_config().optim
  c.learning_rate = learning_rate
  c.schedule = "constant"
  for k, v in overrides.items():
    c[k] = v
  return c


def jitted_step(make_step, model, mesh, batch, *, learning_rate=1e-2, seed=0, **kwargs):
  """(state, step) exactly as the trainer builds them, on `mesh`."""
  tx, schedule = optim.make_optimizer(optim_config(learning_rate), total_steps=100)
  shardings = common.state_sharding(model, tx, mesh)
  state = common.init_train_state(model, tx, jax.random.key(seed), shardings)
  batch_shardings = sharding.batch_shardings(batch, mesh)
  replicated = sharding.replicated(mesh)
  step = jax.jit(make_step(model, tx, schedule, **kwargs),
                 in_shardings=(shardings, batch_shardings, replicated),
                 out_shardings=(shardings, replicated), donate_argnums=(0,))
  return state, step, shardings


def prompts(rng, b=B, p=P, min_real=2):
  """Left-padded prompts of mixed lengths (one full row)."""
  real = rng.integers(min_real, p + 1, size=b)
  real[0] = p
  mask = (np.arange(p)[None, :] >= (p - real)[:, None]).astype(np.int32)
  return (rng.integers(4, VOCAB, size=(b, p)) * mask).astype(np.int32), mask


def responses(rng, shape, r=R, low=4, high=VOCAB, eos=3, min_len=1):
  """Right-padded responses ending in EOS, of mixed lengths (>= min_len tokens)."""
  lengths = rng.integers(min_len, r + 1, size=shape)
  pos = np.arange(r)
  mask = (pos < lengths[..., None]).astype(np.int32)
  tokens = rng.integers(low, high, size=shape + (r,))
  tokens = np.where(pos == lengths[..., None] - 1, eos, tokens)
  return (tokens * mask).astype(np.int32), mask


def max_abs_diff(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
