"""Hugging Face checkpoints in and out: GPT-2, Llama and GPT-NeoX (Pythia).

  load_pretrained(path)            -> (PolicyModel, params), read from a safetensors dir
  load_pretrained_params(path, c, mesh) -> params for a given TransformerConfig / mesh
  transformer_config_for(config.model) -> TransformerConfig (checkpoint's architecture
                                      when config.model.init_from is set)
  transformer_config_from_checkpoint(path, **runtime) -> TransformerConfig
  save_pretrained(policy, params, path) writes config.json + model.safetensors
                                      (sharded with an index past `max_shard_bytes`)

Reading never materialises a parameter on the host or on any device in full unless
its sharding says so: every array is built with `jax.make_array_from_callback`, whose
callback reads exactly the slice one device holds through safetensors' lazy
`get_slice` (fused tensors read the bounding rows of that slice). Checkpoints may be
a single `model.safetensors` or shards listed in `model.safetensors.index.json`.

Mapping tables (HF name -> our path; `L` = Linear weight [out, in], transposed;
`C` = GPT-2 Conv1D weight [in, out], kept; q/k/v/o kernels are split per head:
q [d, H, Dh], k/v [d, Hkv, Dh], o [H, Dh, d]):

  gpt2 (prefix `transformer.`, or none in GPT2Model checkpoints)
    wte.weight                -> trunk/embed/embedding (tied: also the LM head)
    wpe.weight                -> trunk/pos_embed/embedding (first max_len rows)
    h.i.ln_1.{weight,bias}    -> layers_i/attn_norm/norm/{scale,bias}
    h.i.attn.c_attn (C)       -> layers_i/attn/{q,k,v}: out dim is [3, H, Dh]
    h.i.attn.c_proj (C)       -> layers_i/attn/o
    h.i.ln_2                  -> layers_i/mlp_norm/norm
    h.i.mlp.c_fc (C)          -> layers_i/mlp/up        h.i.mlp.c_proj (C) -> mlp/down
    ln_f                      -> trunk/final_norm/norm
  llama (prefix `model.`)
    embed_tokens.weight       -> trunk/embed/embedding
    layers.i.input_layernorm  -> layers_i/attn_norm/norm/scale
    layers.i.self_attn.{q,k,v,o}_proj (L) -> layers_i/attn/{q,k,v,o}
    layers.i.post_attention_layernorm -> layers_i/mlp_norm/norm/scale
    layers.i.mlp.{gate,up,down}_proj (L) -> layers_i/mlp/{gate,up,down}
    norm.weight               -> trunk/final_norm/norm/scale
    lm_head.weight (L)        -> lm_head/kernel (absent when tie_word_embeddings)
  gpt_neox (prefix `gpt_neox.`)
    embed_in.weight           -> trunk/embed/embedding
    layers.i.input_layernorm  -> layers_i/attn_norm/norm
    layers.i.attention.query_key_value (L) -> layers_i/attn/{q,k,v}: out dim is
                                 [H, 3, Dh] (interleaved per head)
    layers.i.attention.dense (L) -> layers_i/attn/o
    layers.i.post_attention_layernorm -> layers_i/mlp_norm/norm
    layers.i.mlp.dense_h_to_4h / dense_4h_to_h (L) -> layers_i/mlp/up / down
    final_layer_norm          -> trunk/final_norm/norm
    embed_out.weight (L)      -> lm_head/kernel

With `scan_layers=True` the per-layer entries are stacked under `trunk/layers` along
a leading [L] axis. RoPE needs no permutation: our rope() uses the same rotate-half
layout as HF Llama / NeoX.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Iterable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import AxisType, Mesh

from rlhf_jax.errors import ConfigError
from rlhf_jax.models.heads import PolicyModel
# The config.json translation lives in hf_config; re-exported for callers of hf.
from rlhf_jax.models.hf_config import (_IGNORED, RUNTIME_FIELDS, _hf_config,
                                       transformer_config_from_hf)
from rlhf_jax.models.transformer import TransformerConfig
from rlhf_jax.sharding import MESH_AXES, logical_to_shardings

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"

# --------------------------------------------------------------------------- mapping


@dataclasses.dataclass(frozen=True)
class _Ref:
  """Where one of our arrays lives inside one HF tensor.

  The HF tensor's dimensions are split into a "view" (`split`: per HF dim, its
  factors); `select` fixes some view dims to an index (q/k/v inside a fused tensor);
  our array is the remaining view dims transposed by `perm` (our dim i = remaining
  dim perm[i]).
  """
  name: str
  split: tuple[tuple[int, ...], ...]
  perm: tuple[int, ...]
  select: tuple[tuple[int, int], ...] = ()

  @property
  def hf_shape(self) -> tuple[int, ...]:
    return tuple(math.prod(s) for s in self.split)

  @property
  def view_shape(self) -> tuple[int, ...]:
    return tuple(d for s in self.split for d in s)

  @property
  def shape(self) -> tuple[int, ...]:
    """Our array's shape."""
    fixed = dict(self.select)
    rest = [d for i, d in enumerate(self.view_shape) if i not in fixed]
    return tuple(rest[p] for p in self.perm)


def _same(name, *shape):
  return _Ref(name, tuple((d,) for d in shape), tuple(range(len(shape))))


def _linear(name, n_in, n_out):
  """torch Linear weight [out, in] -> our Dense kernel [in, out]."""
  return _Ref(name, ((n_out,), (n_in,)), (1, 0))


def _layer_refs(c: TransformerConfig, p: str) -> dict[str, _Ref]:
  """Refs of one layer's params (paths relative to the layer), HF layer prefix `p`."""
  d, f, H, K, Dh = c.d_model, c.d_ff, c.n_heads, c.n_kv_heads, c.head_dim
  refs: dict[str, _Ref] = {}

  def norm(ours, theirs):
    refs[f"{ours}/norm/scale"] = _same(f"{theirs}.weight", d)
    if c.norm == "layernorm":
      refs[f"{ours}/norm/bias"] = _same(f"{theirs}.bias", d)

  if c.family == "gpt2":
    norm("attn_norm", p + "ln_1")
    norm("mlp_norm", p + "ln_2")
    for j, x in enumerate("qkv"):
      refs[f"attn/{x}/kernel"] = _Ref(p + "attn.c_attn.weight", ((d,), (3, H, Dh)),
                                      (0, 1, 2), ((1, j),))
      refs[f"attn/{x}/bias"] = _Ref(p + "attn.c_attn.bias", ((3, H, Dh),), (0, 1), ((0, j),))
    refs["attn/o/kernel"] = _Ref(p + "attn.c_proj.weight", ((H, Dh), (d,)), (0, 1, 2))
    refs["attn/o/bias"] = _same(p + "attn.c_proj.bias", d)
    refs["mlp/up/kernel"] = _same(p + "mlp.c_fc.weight", d, f)
    refs["mlp/up/bias"] = _same(p + "mlp.c_fc.bias", f)
    refs["mlp/down/kernel"] = _same(p + "mlp.c_proj.weight", f, d)
    refs["mlp/down/bias"] = _same(p + "mlp.c_proj.bias", d)
  elif c.family == "llama":
    norm("attn_norm", p + "input_layernorm")
    norm("mlp_norm", p + "post_attention_layernorm")
    for x, heads in (("q", H), ("k", K), ("v", K)):
      name = f"{p}self_attn.{x}_proj"
      refs[f"attn/{x}/kernel"] = _Ref(name + ".weight", ((heads, Dh), (d,)), (2, 0, 1))
      if c.use_bias:
        refs[f"attn/{x}/bias"] = _Ref(name + ".bias", ((heads, Dh),), (0, 1))
    refs["attn/o/kernel"] = _Ref(p + "self_attn.o_proj.weight", ((d,), (H, Dh)), (1, 2, 0))
    if c.use_bias:
      refs["attn/o/bias"] = _same(p + "self_attn.o_proj.bias", d)
    for x, n_in, n_out in (("gate", d, f), ("up", d, f), ("down", f, d)):
      refs[f"mlp/{x}/kernel"] = _linear(f"{p}mlp.{x}_proj.weight", n_in, n_out)
      if c.use_bias:
        refs[f"mlp/{x}/bias"] = _same(f"{p}mlp.{x}_proj.bias", n_out)
  else:  # neox
    norm("attn_norm", p + "input_layernorm")
    norm("mlp_norm", p + "post_attention_layernorm")
    for j, x in enumerate("qkv"):
      refs[f"attn/{x}/kernel"] = _Ref(p + "attention.query_key_value.weight",
                                      ((H, 3, Dh), (d,)), (2, 0, 1), ((1, j),))
      refs[f"attn/{x}/bias"] = _Ref(p + "attention.query_key_value.bias", ((H, 3, Dh),),
                                    (0, 1), ((1, j),))
    refs["attn/o/kernel"] = _Ref(p + "attention.dense.weight", ((d,), (H, Dh)), (1, 2, 0))
    refs["attn/o/bias"] = _same(p + "attention.dense.bias", d)
    refs["mlp/up/kernel"] = _linear(p + "mlp.dense_h_to_4h.weight", d, f)
    refs["mlp/up/bias"] = _same(p + "mlp.dense_h_to_4h.bias", f)
    refs["mlp/down/kernel"] = _linear(p + "mlp.dense_4h_to_h.weight", f, d)
    refs["mlp/down/bias"] = _same(p + "mlp.dense_4h_to_h.bias", d)
  return refs


_CANONICAL_PREFIX = {"gpt2": "transformer.", "llama": "model.", "neox": "gpt_neox."}
_EMBED_NAME = {"gpt2": "wte.weight", "llama": "embed_tokens.weight",
               "neox": "embed_in.weight"}


def param_refs(c: TransformerConfig, prefix: Optional[str] = None,
               pos_rows: Optional[int] = None) -> dict[str, list[_Ref]]:
  """Our param path ('trunk/layers_0/attn/q/kernel') -> its HF refs.

  One ref per path, or (scan_layers) one per layer, stacked along a leading axis.
  `pos_rows`: rows of the checkpoint's position table (ours may use fewer).
  """
  p = _CANONICAL_PREFIX[c.family] if prefix is None else prefix
  d, V = c.d_model, c.vocab_size
  refs: dict[str, list[_Ref]] = {}
  refs["trunk/embed/embedding"] = [_same(p + _EMBED_NAME[c.family], V, d)]
  if c.positions == "learned":
    refs["trunk/pos_embed/embedding"] = [_same(p + "wpe.weight", pos_rows or c.max_len, d)]
  final = {"gpt2": "ln_f", "llama": "norm", "neox": "final_layer_norm"}[c.family]
  refs["trunk/final_norm/norm/scale"] = [_same(f"{p}{final}.weight", d)]
  if c.norm == "layernorm":
    refs["trunk/final_norm/norm/bias"] = [_same(f"{p}{final}.bias", d)]
  if not c.tied_embeddings:
    head = {"gpt2": "lm_head.weight", "llama": "lm_head.weight",
            "neox": "embed_out.weight"}[c.family]
    refs["lm_head/kernel"] = [_linear(head, d, V)]
  layer_word = "h" if c.family == "gpt2" else "layers"
  per_layer = [_layer_refs(c, f"{p}{layer_word}.{i}.") for i in range(c.n_layers)]
  for sub in per_layer[0]:
    if c.scan_layers:
      refs[f"trunk/layers/{sub}"] = [layer[sub] for layer in per_layer]
    else:
      for i, layer in enumerate(per_layer):
        refs[f"trunk/layers_{i}/{sub}"] = [layer[sub]]
  return refs


# --------------------------------------------------------------------------- reading


class _Checkpoint:
  """Lazy access to the tensors of a (possibly sharded) safetensors checkpoint."""

  def __init__(self, path: str):
    from safetensors import safe_open  # pylint: disable=import-outside-toplevel
    self._open = safe_open
    self.path = path
    self._handles: dict[str, Any] = {}
    index = os.path.join(path, INDEX_FILE)
    single = os.path.join(path, SINGLE_FILE)
    if os.path.exists(index):
      with open(index) as f:
        self.weight_map = dict(json.load(f)["weight_map"])
    elif os.path.exists(single):
      self.weight_map = {name: SINGLE_FILE for name in self._file(SINGLE_FILE).keys()}
    else:
      raise FileNotFoundError(f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE}")

  def _file(self, filename):
    if filename not in self._handles:
      self._handles[filename] = self._open(os.path.join(self.path, filename),
                                           framework="numpy")
    return self._handles[filename]

  def _slice(self, name):
    if name not in self.weight_map:
      raise KeyError(f"{self.path}: tensor {name!r} not in the checkpoint")
    return self._file(self.weight_map[name]).get_slice(name)

  def shape(self, name) -> tuple[int, ...]:
    return tuple(self._slice(name).get_shape())

  def read(self, name, slices: tuple[slice, ...]) -> np.ndarray:
    return np.asarray(self._slice(name)[slices])

  def close(self):
    self._handles.clear()


def _norm_index(index, shape) -> tuple[slice, ...]:
  out = []
  for sl, dim in zip(tuple(index) + (slice(None),) * (len(shape) - len(index)), shape):
    start, stop, step = sl.indices(dim)
    if step != 1:
      raise ValueError("strided shard index")
    out.append(slice(start, stop))
  return tuple(out)


def _read_ref(ckpt: _Checkpoint, ref: _Ref, index: tuple[slice, ...]) -> np.ndarray:
  """Our array's slice `index` (normalised slices over our dims) from the HF tensor."""
  fixed = dict(ref.select)
  n_view = len(ref.view_shape)
  remaining = [i for i in range(n_view) if i not in fixed]
  view_slices: list[slice] = [slice(0)] * n_view
  for dim, k in fixed.items():
    view_slices[dim] = slice(k, k + 1)
  for i, sl in enumerate(index):
    view_slices[remaining[ref.perm[i]]] = sl
  hf_slices, box_shape, inner = [], [], []
  dim = 0
  for split in ref.split:
    group = view_slices[dim:dim + len(split)]
    dim += len(split)
    # Leading factors cut to one index are an offset; then read the rows spanned by
    # the first wider factor, and cut the factors inside it after reading.
    k, offset = 0, 0
    while k < len(split) - 1 and group[k].stop - group[k].start == 1:
      offset += group[k].start * math.prod(split[k + 1:])
      k += 1
    stride = math.prod(split[k + 1:])
    hf_slices.append(slice(offset + group[k].start * stride, offset + group[k].stop * stride))
    box_shape += [1] * k + [group[k].stop - group[k].start, *split[k + 1:]]
    inner += [slice(None)] * (k + 1) + list(group[k + 1:])
  box = ckpt.read(ref.name, tuple(hf_slices)).reshape(box_shape)[tuple(inner)]
  box = box.reshape([s.stop - s.start for i, s in enumerate(view_slices) if i not in fixed])
  return np.transpose(box, ref.perm)


def _check_shapes(ckpt: _Checkpoint, refs: dict[str, list[_Ref]], c: TransformerConfig):
  for path, rs in refs.items():
    for ref in rs:
      have = ckpt.shape(ref.name)
      want = ref.hf_shape
      if path == "trunk/pos_embed/embedding":
        ok = have[1:] == want[1:] and have[0] >= c.max_len
      else:
        ok = have == want
      if not ok:
        raise ConfigError(f"{ckpt.path}: {ref.name} has shape {have}, the model needs "
                          f"{want} for {path}")
  used = {ref.name for rs in refs.values() for ref in rs}
  extra = sorted(n for n in ckpt.weight_map if n not in used and not _IGNORED.search(n)
                 and not (c.tied_embeddings and n in ("lm_head.weight", "embed_out.weight")))
  if extra:
    raise ConfigError(f"{ckpt.path}: tensors not used by a {c.family} model of this "
                      f"config: {extra[:8]}{' ...' if len(extra) > 8 else ''}")


def _detect_prefix(ckpt: _Checkpoint, family: str) -> str:
  embed = _EMBED_NAME[family]
  for name in ckpt.weight_map:
    if name.endswith(embed):
      return name[: -len(embed)]
  raise ConfigError(f"{ckpt.path}: no *{embed} tensor (is this a {family} checkpoint?)")


def read_hf_config(path: str) -> dict:
  with open(os.path.join(path, CONFIG_FILE)) as f:
    return json.load(f)


def transformer_config_from_checkpoint(path: str, **runtime) -> TransformerConfig:
  """The checkpoint's architecture with runtime fields (dtype, remat, ...) set."""
  return transformer_config_from_hf(read_hf_config(path), **runtime)


def transformer_config_for(model_config) -> TransformerConfig:
  """The trainers' model config: `config.model`, or with `config.model.init_from` set,
  the checkpoint's architecture plus config.model's runtime fields (dtype,
  param_dtype, remat, scan_layers, max_len). Pair with `load_pretrained_params`."""
  path = model_config.get("init_from") or ""
  if not path:
    return TransformerConfig.from_config(model_config)
  runtime = {f: model_config.get(f) for f in RUNTIME_FIELDS
             if model_config.get(f) is not None}
  return transformer_config_from_checkpoint(path, **runtime)


def _default_mesh() -> Mesh:
  return jax.make_mesh((1, 1, 1), MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                       devices=jax.devices()[:1])


def _abstract_params(model: nn.Module):
  dummy = jnp.ones((1, 1), jnp.int32)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), dummy)["params"])


_ARCH_FIELDS = ("family", "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads",
                "d_ff", "norm", "norm_eps", "positions", "rope_theta", "rotary_pct", "mlp",
                "use_bias", "tied_embeddings", "parallel_residual")


def load_pretrained_params(path: str, config: TransformerConfig,
                           mesh: Optional[Mesh] = None) -> Any:
  """PolicyModel(config) params read from the HF checkpoint at `path`, sharded on `mesh`.

  `config` must have the checkpoint's architecture (build it with
  `transformer_config_for(config.model)` or
  `transformer_config_from_checkpoint(path, dtype=..., scan_layers=...)`); a mismatch
  raises ConfigError naming the fields. Each device's shard is read straight from the
  safetensors files. For value / reward models use the result's "trunk" subtree.
  """
  mesh = _default_mesh() if mesh is None else mesh
  theirs = transformer_config_from_checkpoint(path)
  diff = [f"{f}: config {getattr(config, f)!r} vs checkpoint {getattr(theirs, f)!r}"
          for f in _ARCH_FIELDS if getattr(config, f) != getattr(theirs, f)]
  if config.positions == "learned" and config.max_len > theirs.max_len:
    diff.append(f"max_len: config {config.max_len} > checkpoint {theirs.max_len}")
  if diff:
    raise ConfigError(f"{path} does not match the model config: " + "; ".join(diff))

  ckpt = _Checkpoint(path)
  try:
    refs = param_refs(config, _detect_prefix(ckpt, config.family),
                      pos_rows=theirs.max_len)
    _check_shapes(ckpt, refs, config)
    abstract = _abstract_params(PolicyModel(config))
    shardings = logical_to_shardings(abstract, mesh)
    shapes = traverse_util.flatten_dict(nn.meta.unbox(abstract), sep="/")
    flat_shardings = traverse_util.flatten_dict(shardings, sep="/")
    if set(shapes) != set(refs):
      raise RuntimeError(f"param mapping out of date: model has "
                         f"{sorted(set(shapes) ^ set(refs))} unmapped")
    out = {}
    for path_, struct in shapes.items():
      rs = refs[path_]
      np_dtype = np.dtype(struct.dtype)

      def callback(index, rs=rs, shape=struct.shape, np_dtype=np_dtype,
                   is_stacked=path_.startswith("trunk/layers/")):
        index = _norm_index(index, shape)
        if is_stacked:
          layers = range(*index[0].indices(shape[0]))
          parts = [_read_ref(ckpt, rs[l], index[1:]) for l in layers]
          arr = np.stack(parts) if parts else np.zeros(
              [s.stop - s.start for s in index], np_dtype)
        else:
          arr = _read_ref(ckpt, rs[0], index)
        return np.ascontiguousarray(arr.astype(np_dtype))

      out[path_] = jax.make_array_from_callback(struct.shape, flat_shardings[path_],
                                                callback)
    return traverse_util.unflatten_dict(out, sep="/")
  finally:
    ckpt.close()


def load_pretrained(path: str, dtype: Any = "float32", mesh: Optional[Mesh] = None, *,
                    param_dtype: Any = "float32", scan_layers: bool = False,
                    remat: str = "none", max_len: Optional[int] = None
                    ) -> tuple[PolicyModel, Any]:
  """(PolicyModel, params) from an HF GPT-2 / Llama / GPT-NeoX safetensors directory.

  `dtype` is the compute dtype and `param_dtype` the stored one (weights are cast on
  reading). Without `mesh` the params live on the first device; with one, each
  parameter is sharded by the logical-axis rules of rlhf_jax.sharding.
  `policy.apply({"params": params}, input_ids)` returns float32 logits [B, T, V].
  """
  config = transformer_config_from_checkpoint(
      path, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers, remat=remat,
      max_len=max_len)
  return PolicyModel(config), load_pretrained_params(path, config, mesh)


# --------------------------------------------------------------------------- writing


def _to_host(x: jax.Array, layer: Optional[int]) -> np.ndarray:
  if layer is not None:
    x = x[layer]
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def save_pretrained(policy: PolicyModel, params: Any, path: str, *,
                    dtype: Any = None, max_shard_bytes: int = 4 << 30,
                    extra_config: Optional[dict] = None) -> None:
  """Writes `path/config.json` and safetensors weights that transformers loads.

  `dtype`: the stored dtype (default: the params' own). Past `max_shard_bytes` the
  weights are split into model-0000i-of-0000n.safetensors files with an index.
  `extra_config` is merged into config.json (e.g. bos_token_id / eos_token_id).
  Every parameter is gathered one (layer) slice at a time; on multi-host runs all
  processes must call this and only process 0 writes.
  """
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  c = policy.config
  flat = traverse_util.flatten_dict(params, sep="/")
  refs = param_refs(c)
  if set(flat) != set(refs):
    raise ValueError(f"params do not match a {c.family} PolicyModel: "
                     f"{sorted(set(flat) ^ set(refs))}")
  first = next(iter(flat.values()))
  out_dtype = np.dtype(jnp.dtype(first.dtype if dtype is None else dtype))
  hf_config = _hf_config(c, str(jnp.dtype(out_dtype)))
  hf_config.update(extra_config or {})

  # HF tensor name -> [(our path, layer or None, ref)], in a stable order.
  targets: dict[str, list[tuple[str, Optional[int], _Ref]]] = {}
  for p, rs in refs.items():
    for l, ref in enumerate(rs):
      targets.setdefault(ref.name, []).append(
          (p, l if p.startswith("trunk/layers/") else None, ref))
  names = sorted(targets)
  files: list[list[str]] = [[]]
  size = 0
  for name in names:
    nbytes = math.prod(targets[name][0][2].hf_shape) * out_dtype.itemsize
    if files[-1] and size + nbytes > max_shard_bytes:
      files.append([])
      size = 0
    files[-1].append(name)
    size += nbytes
  filenames = ([SINGLE_FILE] if len(files) == 1 else
               [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
                for i in range(len(files))])
  writer = jax.process_index() == 0
  if writer:
    os.makedirs(path, exist_ok=True)
  total = 0
  for filename, group in zip(filenames, files):
    tensors = {}
    for name in group:
      parts = targets[name]
      view = np.zeros(parts[0][2].view_shape, out_dtype)
      filled = 0
      for p, layer, ref in parts:
        fixed = dict(ref.select)
        idx = tuple(fixed.get(i, slice(None)) for i in range(view.ndim))
        ours = _to_host(flat[p], layer)
        if ours.shape != ref.shape:
          raise ValueError(f"{p}: shape {ours.shape} != {ref.shape}")
        view[idx] = np.transpose(ours, np.argsort(ref.perm)).astype(out_dtype)
        filled += ours.size
      if filled != view.size:
        raise RuntimeError(f"{name}: only {filled} of {view.size} values mapped")
      tensors[name] = np.ascontiguousarray(view.reshape(parts[0][2].hf_shape))
      total += tensors[name].nbytes
    if writer:
      save_file(tensors, os.path.join(path, filename), metadata={"format": "pt"})
  if writer:
    if len(files) > 1:
      index = {"metadata": {"total_size": total},
               "weight_map": {n: f for f, g in zip(filenames, files) for n in g}}
      with open(os.path.join(path, INDEX_FILE), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
      json.dump(hf_config, f, indent=2, sort_keys=True)


def hf_tensor_names(path: str) -> Iterable[str]:
  """Names of the tensors in a checkpoint directory (single-file or sharded)."""
  return list(_Checkpoint(path).weight_map)
