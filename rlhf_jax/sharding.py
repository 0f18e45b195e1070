"""The device mesh, the logical-axis rules, and shardings derived from them.

Every parameter and block-boundary activation in `rlhf_jax.models` is annotated with
*logical* axis names ('embed', 'mlp', 'batch', ...). This module holds the one table
that maps those names onto the mesh axes ('data', 'fsdp', 'tensor'), and the helpers
that turn a model's annotations into `NamedSharding`s. Shardings are derived, never
written by hand: `jax.eval_shape(init)` -> `nn.get_partition_spec` ->
`nn.logical_to_mesh` -> `NamedSharding`, then `jax.jit(init, out_shardings=...)`
creates the parameters already in their shards.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from rlhf_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (or None: replicated). Parameters are sharded over 'fsdp'
# along their model dimension and over 'tensor' along heads / mlp / vocab (Megatron
# style); activations keep the model dimension whole and split the batch over both
# data-parallel axes. This is the only place that decides how anything is laid out.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    # Activations.
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_vocab", "tensor"),
    # Parameters.
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("norm", None),
)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """Sharding constraint by logical names; a no-op outside a mesh context.

  Inside a `jax.shard_map` that makes some mesh axes manual, those axes are
  dropped from the rules: the values are already per-shard along them.
  """
  manual = set(jax.sharding.get_abstract_mesh().manual_axes)
  return nn.with_logical_constraint(x, tuple(logical_axes), rules=_rules_without(manual))


def _rules_without(axes: set[str]) -> tuple[tuple[str, Any], ...]:
  """LOGICAL_AXIS_RULES with the mesh axes `axes` removed from every target."""
  if not axes:
    return LOGICAL_AXIS_RULES
  def keep(target):
    if isinstance(target, tuple):
      kept = tuple(a for a in target if a not in axes)
      return kept or None
    return None if target in axes else target
  return tuple((name, keep(target)) for name, target in LOGICAL_AXIS_RULES)


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the ('data', 'fsdp', 'tensor') mesh from `config.mesh`.

  One field may be -1 and then takes all remaining devices. The axis types are
  Auto because linen's logical constraints are GSPMD hints, not explicit types.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  sizes = {axis: int(getattr(mesh_config, axis)) for axis in MESH_AXES}
  for axis, size in sizes.items():
    if size == 0 or size < -1:
      raise ConfigError(f"config.mesh.{axis}: {size} is not a positive size or -1")
  fill = [axis for axis, size in sizes.items() if size == -1]
  if len(fill) > 1:
    raise ConfigError(f"config.mesh: only one of {fill} may be -1")
  known = math.prod(size for size in sizes.values() if size != -1)
  shape_text = " x ".join(f"{a}={s}" for a, s in sizes.items())
  if fill:
    if n % known:
      raise ConfigError(
          f"config.mesh: {shape_text} does not divide the {n} available devices")
    sizes[fill[0]] = n // known
  elif known != n:
    raise ConfigError(
        f"config.mesh: {shape_text} uses {known} devices but {n} are available")
  return jax.make_mesh(
      tuple(sizes[a] for a in MESH_AXES), MESH_AXES,
      axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def _fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
  """Drops mesh axes from dimensions they do not divide (e.g. 3 kv-heads on 2).

  A NamedSharding must divide its array evenly; replicating that one dimension is
  always correct and only costs memory, so a small model still runs on a big mesh.
  """
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      fitted.append(None)
      continue
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    kept = []
    for name in names:
      if dim % (math.prod(mesh.shape[k] for k in kept) * mesh.shape[name]) == 0:
        kept.append(name)
    fitted.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return PartitionSpec(*fitted)


def logical_to_shardings(abstract_boxed: Any, mesh: Mesh) -> Any:
  """NamedShardings for a tree of logically-annotated (boxed) abstract values."""
  logical_specs = nn.get_partition_spec(abstract_boxed)
  mesh_specs = nn.logical_to_mesh(logical_specs, LOGICAL_AXIS_RULES)
  shapes = nn.meta.unbox(abstract_boxed)
  return jax.tree.map(
      lambda spec, x: NamedSharding(mesh, _fit_spec(spec, x.shape, mesh)),
      mesh_specs, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec))


def init_sharded(init_fn: Callable[[jax.Array], Any], rng: jax.Array,
                 mesh: Mesh) -> tuple[Any, Any]:
  """Runs `init_fn(rng)` (returning boxed params) so params are born sharded.

  Returns (params, shardings). No device ever holds a full copy of the params.
  """
  abstract = jax.eval_shape(init_fn, rng)
  shardings = logical_to_shardings(abstract, mesh)
  params = jax.jit(lambda r: nn.meta.unbox(init_fn(r)), out_shardings=shardings)(rng)
  return params, shardings


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Leading (batch) dimension split over both data-parallel axes."""
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def data_parallel_size(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's share of the global batch into global arrays."""
  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)
  return {k: put(v) for k, v in batch.items()}


def batch_shardings(batch_like: dict[str, Any], mesh: Mesh) -> dict[str, NamedSharding]:
  return {k: batch_sharding(mesh, np.ndim(v) if not hasattr(v, "ndim") else v.ndim)
          for k, v in batch_like.items()}
