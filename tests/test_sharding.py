"""Mesh construction, derived shardings, and sharded == single-device forwards."""
import json
import pathlib

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from rlhf_jax import sharding
from rlhf_jax.errors import ConfigError
from rlhf_jax.models import heads
from tests.models.model_fixtures import FAMILIES, init_params, left_padded_prompts, tiny_config

GOLDEN = pathlib.Path(__file__).parent / "golden" / "llama_partition_specs.json"


def mesh_config(data, fsdp, tensor):
  return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor))


def test_mesh_fills_minus_one_and_uses_auto_axes():
  mesh = sharding.make_mesh(mesh_config(-1, 2, 2))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize("shape, message", [
    ((3, 1, -1), "config.mesh: data=3 x fsdp=1 x tensor=-1 does not divide the 8"),
    ((2, 2, 1), "config.mesh: data=2 x fsdp=2 x tensor=1 uses 4 devices but 8"),
    ((-1, -1, 1), "config.mesh: only one of"),
    ((0, 1, 1), "config.mesh.data: 0 is not a positive size"),
])
def test_bad_mesh_is_a_clear_config_error(shape, message):
  with pytest.raises(ConfigError, match=message):
    sharding.make_mesh(mesh_config(*shape))


def test_fit_spec_replicates_dimensions_an_axis_does_not_divide():
  mesh = sharding.make_mesh(mesh_config(2, 2, 2))
  spec = sharding._fit_spec(PartitionSpec("fsdp", "tensor"), (6, 3), mesh)
  assert spec == PartitionSpec("fsdp", None)
  spec = sharding._fit_spec(PartitionSpec(("data", "fsdp")), (2,), mesh)
  assert spec == PartitionSpec("data")


def _partition_specs(model):
  abstract = jax.eval_shape(
      lambda r: model.init(r, jnp.ones((1, 4), jnp.int32))["params"], jax.random.key(0))
  mesh = sharding.make_mesh(mesh_config(2, 2, 2))
  shardings = sharding.logical_to_shardings(abstract, mesh)
  flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
  return {"/".join(str(getattr(k, "key", k)) for k in path): list(s.spec)
          for path, s in flat}


def test_partition_specs_match_golden_file():
  """Param path -> PartitionSpec on a 2x2x2 mesh, checked in as JSON.

  Regenerate deliberately with: UPDATE_GOLDEN=1 pytest tests/test_sharding.py
  """
  specs = _partition_specs(heads.PolicyModel(tiny_config("llama")))
  specs = json.loads(json.dumps(specs))  # tuples -> lists, as stored
  import os
  if os.environ.get("UPDATE_GOLDEN"):
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(specs, indent=1, sort_keys=True) + "\n")
  assert specs == json.loads(GOLDEN.read_text())


def _sharded_equals_single(model_cls, family, mesh_shape):
  config = tiny_config(family)
  model = model_cls(config)
  params = init_params(model)
  tokens, mask = left_padded_prompts(batch=8, length=6, seed=3)
  apply = lambda p, t, m: model.apply({"params": p}, t, m)
  single = jax.jit(apply)(params, tokens, mask)

  mesh = sharding.make_mesh(mesh_config(*mesh_shape))
  params_sharded, param_shardings = sharding.init_sharded(
      lambda r: model.init(r, jnp.ones((1, 4), jnp.int32))["params"],
      jax.random.key(0), mesh)
  # Same values as the single-device params, laid out by the derived shardings.
  chex.assert_trees_all_close(params_sharded, params, atol=0)
  batch_sharding = sharding.batch_sharding(mesh, 2)
  with jax.set_mesh(mesh):
    sharded = jax.jit(apply, in_shardings=(param_shardings, batch_sharding,
                                           batch_sharding))(params_sharded, tokens, mask)
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=1e-5, rtol=1e-5)
  return params_sharded


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("model_cls", [heads.PolicyModel, heads.ValueModel,
                                       heads.RewardModel])
def test_forward_on_2x2x2_mesh_equals_single_device(family, model_cls):
  params = _sharded_equals_single(model_cls, family, (2, 2, 2))
  # The params really are split: some leaf lives in 1/4 or less of a full copy.
  shard_fractions = [x.addressable_shards[0].data.size / x.size
                     for x in jax.tree.leaves(params) if x.size > 1]
  assert min(shard_fractions) <= 0.25


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_forward_on_fsdp_mesh_equals_single_device(family):
  _sharded_equals_single(heads.PolicyModel, family, (1, 8, 1))
