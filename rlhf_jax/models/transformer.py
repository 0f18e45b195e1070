"""The decoder-only trunk shared by the policy, value and reward networks.

One module, three families chosen by `config.model.family`:

  gpt2   learned positions, LayerNorm, GELU MLP, biases, tied embeddings
  llama  RoPE, RMSNorm, SwiGLU MLP, grouped-query attention, no biases, untied
  neox   partial RoPE, LayerNorm, GELU MLP, biases, parallel residual, untied (Pythia)

Parameter names follow the checkpoints they are imported from (see models/hf.py):
`embed`, `pos_embed`, `layers_{i}/{attn_norm, attn/{q,k,v,o}, mlp_norm, mlp/{gate,up,down}}`,
`final_norm`, so an HF import is a short renaming table. Every parameter carries
logical axis names (rlhf_jax/sharding.py maps them onto the mesh).

The same call computes a full teacher-forced pass or a step of cached decoding: with
`cache`, the new keys/values are written at slot `cache_index` and the queries attend
over the whole cache. `mask` is the key mask over the tokens (full pass) or over the
cache slots (cached pass): 1 for real tokens, so left padding is simply masked out.

`read` names the positions whose hidden states the caller will use: a static
`(start, length)` slice, or int indices [B, Q]. Every layer but the last still runs at
every position (later layers attend to their keys and values), but the last one
needs only its keys and values everywhere: its queries, attention output and MLP run
at the read positions alone. A reward model read at the EOS, a value head and an LM
head read over the response, or a prefill read at its last token skip most of a
layer's FLOPs this way, with the same outputs.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from rlhf_jax.errors import ConfigError
from rlhf_jax.models import attention
from rlhf_jax.sharding import constrain

LayerCache = dict[str, jax.Array]  # {'k': [B, Hkv, S, Dh], 'v': ...}
Cache = Any  # list of LayerCache, or one stacked over layers (see init_cache)
Read = Any  # None (every position), a static (start, length) slice, or indices [B, Q]

_FAMILIES = {
    "gpt2": dict(norm="layernorm", positions="learned", mlp="gelu_tanh", use_bias=True,
                 tied_embeddings=True, parallel_residual=False, rotary_pct=1.0),
    "llama": dict(norm="rmsnorm", positions="rope", mlp="swiglu", use_bias=False,
                  tied_embeddings=False, parallel_residual=False, rotary_pct=1.0),
    "neox": dict(norm="layernorm", positions="rope", mlp="gelu", use_bias=True,
                 tied_embeddings=False, parallel_residual=True, rotary_pct=0.25),
}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Static model hyper-parameters (hashable: safe to close over in jit)."""
  family: str = "gpt2"
  vocab_size: int = 8000
  d_model: int = 256
  n_layers: int = 4
  n_heads: int = 4
  n_kv_heads: int = 4
  d_ff: int = 1024
  max_len: int = 1024
  norm: str = "layernorm"
  norm_eps: float = 1e-5
  positions: str = "learned"
  rope_theta: float = 10000.0
  rotary_pct: float = 1.0
  mlp: str = "gelu_tanh"
  use_bias: bool = True
  tied_embeddings: bool = True
  parallel_residual: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: str = "none"  # 'none' | 'full' | 'dots' (save matmul outputs)
  scan_layers: bool = False
  init_std: float = 0.02

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  @classmethod
  def from_config(cls, model_config) -> "TransformerConfig":
    """Family defaults, then any field set (not None) in `config.model`."""
    cfg = dict(model_config)
    family = cfg.get("family", "gpt2")
    if family not in _FAMILIES:
      raise ConfigError(
          f"config.model.family: {family!r} is not one of {sorted(_FAMILIES)}")
    fields = {f.name for f in dataclasses.fields(cls)}
    values = dict(_FAMILIES[family], family=family)
    values.update({k: v for k, v in cfg.items() if k in fields and v is not None})
    values["dtype"] = jnp.dtype(values.get("dtype", "float32"))
    values["param_dtype"] = jnp.dtype(values.get("param_dtype", "float32"))
    if values.get("n_kv_heads") in (None, 0):
      values["n_kv_heads"] = values.get("n_heads", cls.n_heads)
    config = cls(**values)
    config.validate()
    return config

  def validate(self) -> None:
    if self.d_model % self.n_heads:
      raise ConfigError(f"config.model.d_model: {self.d_model} is not divisible by "
                        f"n_heads={self.n_heads}")
    if self.n_heads % self.n_kv_heads:
      raise ConfigError(f"config.model.n_kv_heads: {self.n_kv_heads} does not divide "
                        f"n_heads={self.n_heads}")
    if self.remat not in ("none", "full", "dots"):
      raise ConfigError(f"config.model.remat: {self.remat!r} is not none|full|dots")

  def param_count(self) -> int:
    """Parameters of the trunk + LM head (what MFU estimates multiply)."""
    d, f, L = self.d_model, self.d_ff, self.n_layers
    kv = self.n_kv_heads * self.head_dim
    attn = d * d * 2 + d * kv * 2
    mlp = d * f * (3 if self.mlp == "swiglu" else 2)
    emb = self.vocab_size * d * (1 if self.tied_embeddings else 2)
    pos = self.max_len * d if self.positions == "learned" else 0
    return L * (attn + mlp) + emb + pos


def _init(std: float, axes: tuple[str, ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


def _zeros(axes: tuple[str, ...]):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def as_token_rows(fn, x: jax.Array) -> jax.Array:
  """`fn` applied to x [B, T, ...] as one matrix of token rows [B * T, ...].

  A projection written over [B, T, d] is a matmul with two batch-like dimensions,
  and for its weight gradient XLA's CPU backend then transposes the activations
  (a [B*T, d_ff] copy per MLP layer) before the dot; on token rows it passes them
  to the dot as they are. The same math and the same params; on a 2-core CPU an
  MLP layer's forward + backward at 4,096 tokens ran 1.5x faster. B is the major
  dimension, so a batch sharded over the mesh stays sharded the same way on the rows.
  """
  rows = fn(x.reshape((-1,) + x.shape[2:]))
  return rows.reshape(x.shape[:2] + rows.shape[1:])


class Norm(nn.Module):
  config: TransformerConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    scale_init = nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",))
    if c.norm == "rmsnorm":
      return nn.RMSNorm(epsilon=c.norm_eps, dtype=c.dtype, param_dtype=c.param_dtype,
                        scale_init=scale_init, name="norm")(x)
    return nn.LayerNorm(epsilon=c.norm_eps, dtype=c.dtype, param_dtype=c.param_dtype,
                        scale_init=scale_init, bias_init=_zeros(("norm",)),
                        name="norm")(x)


def rope(x: jax.Array, positions: jax.Array, theta: float, rotary_pct: float) -> jax.Array:
  """Rotary embedding on the first `rotary_pct` of each head ("rotate half" layout).

  x: [B, T, H, Dh]; positions: [B, T]. The rotate-half layout is the one HF Llama and
  GPT-NeoX checkpoints are stored in, so no permutation is needed on import.
  """
  dim = int(x.shape[-1] * rotary_pct)
  rot, keep = x[..., :dim], x[..., dim:]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B,T,dim/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  first, second = jnp.split(rot.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([-second, first], axis=-1)
  out = rot.astype(jnp.float32) * cos + rotated * sin
  return jnp.concatenate([out.astype(x.dtype), keep], axis=-1)


class Projection(nn.Module):
  """One of q/k/v: a kernel [d_model, heads, head_dim] and a bias [heads, head_dim].

  The names, shapes and initialisation of nn.DenseGeneral's, but returned rather than
  applied, so that projections of the same input run as one matmul (`project`).
  """
  config: TransformerConfig
  heads: int
  heads_axis: str  # logical name of the heads dimension: 'heads' or 'kv_heads'

  @nn.compact
  def __call__(self):
    c = self.config
    kernel = self.param("kernel", _init(c.init_std, ("embed", self.heads_axis, "kv")),
                        (c.d_model, self.heads, c.head_dim), c.param_dtype)
    bias = None
    if c.use_bias:
      bias = self.param("bias", _zeros((self.heads_axis, "kv")), (self.heads, c.head_dim),
                        c.param_dtype)
    return kernel, bias


def project(x: jax.Array, projections, dtype) -> list[jax.Array]:
  """x [B, T, d] through each (kernel, bias) of `projections` -> [B, T, heads, Dh] each.

  Kernels of equal shape are stacked and applied as one matmul, whose input
  gradient is one matmul too, not three and two additions (on a 2-core CPU the
  benchmark PPO update ran 5% faster, sampling 7%). The stack is a plain 2-D matmul
  over token rows, [B*T, d] @ [d, H * n * Dh]: as a 4-D einsum, XLA's CPU backend
  transposed the [B*T, n, H, Dh] output gradient and the kernels for the weight
  gradient (forward + backward of the stacked q, k, v: 39 -> 21 ms at 4,096 tokens,
  d_model 256). Heads are the major part of the merged axis, so a heads axis
  sharded over 'tensor' stays sharded.
  """
  kernels = jnp.stack([k for k, _ in projections], axis=2).astype(dtype)  # [d, H, n, Dh]
  d, heads, n, head_dim = kernels.shape
  matrix = kernels.reshape(d, heads * n * head_dim)
  out = as_token_rows(lambda rows: (rows @ matrix).reshape(-1, heads, n, head_dim),
                      x.astype(dtype))  # [B, T, H, n, Dh]
  if projections[0][1] is not None:
    out = out + jnp.stack([b for _, b in projections], axis=1).astype(dtype)
  return [out[:, :, :, i] for i in range(n)]


class Attention(nn.Module):
  config: TransformerConfig

  @nn.compact
  def __call__(self, x, positions, mask, cache: Optional[LayerCache], cache_index,
               read: Read = None):
    """Keys and values from every position of `x`; queries only at `read`."""
    c = self.config
    q_proj = Projection(c, c.n_heads, "heads", name="q")
    k_proj = Projection(c, c.n_kv_heads, "kv_heads", name="k")
    v_proj = Projection(c, c.n_kv_heads, "kv_heads", name="v")
    if read is None and c.n_heads == c.n_kv_heads:  # one input, one shape: one matmul
      q, k, v = project(x, [q_proj(), k_proj(), v_proj()], c.dtype)
    else:
      (q,) = project(read_positions(x, read), [q_proj()], c.dtype)
      k, v = project(x, [k_proj(), v_proj()], c.dtype)
    if c.positions == "rope":
      q = rope(q, read_positions(positions, read), c.rope_theta, c.rotary_pct)
      k = rope(k, positions, c.rope_theta, c.rotary_pct)

    # Slots (cache positions) of the queries, [1 or B, Tq], and of the keys, [S].
    query_slots = _read_slots(x.shape[1], read)
    if cache is None:
      keys, values = k.swapaxes(1, 2), v.swapaxes(1, 2)  # [B, Hkv, T, Dh]
    else:
      cache = write_cache(cache, cache_index, k, v)
      query_slots = cache_index + query_slots
      keys, values = cache["k"], cache["v"]
    key_slots = jnp.arange(keys.shape[2])
    causal = key_slots <= query_slots[..., None]
    # A query always sees itself, so padding rows stay finite (their outputs are
    # never read); real rows are unaffected because their own key is real.
    allowed = (causal & (mask[:, None, :] > 0)) | (key_slots == query_slots[..., None])
    q, keys, values = q.astype(c.dtype), keys.astype(c.dtype), values.astype(c.dtype)
    on_cpu = jax.default_backend() == "cpu"
    if cache is None and not on_cpu:
      # Full pass on an accelerator: the fused kernel (cuDNN flash attention on GPU).
      out = jax.nn.dot_product_attention(q, keys.swapaxes(1, 2), values.swapaxes(1, 2),
                                         mask=allowed[:, None, :, :])
    elif on_cpu and q.shape[1] > 1:  # several queries per row: training, scoring, prefill
      out = attention.block_attention(q, keys, values, allowed)
    else:  # decoding, and cached passes on an accelerator
      out = attention.decode_attention(q, keys, values, allowed)
    out = constrain(out, ("batch", "length", "act_heads", None))
    out = nn.DenseGeneral(c.d_model, axis=(-2, -1), dtype=c.dtype,
                          param_dtype=c.param_dtype, use_bias=c.use_bias,
                          kernel_init=_init(c.init_std, ("heads", "kv", "embed")),
                          bias_init=_zeros(("embed",)), name="o")(out)
    return out, cache


class Mlp(nn.Module):
  config: TransformerConfig

  @nn.compact
  def __call__(self, x):
    """x [B, T, d_model] -> [B, T, d_model], computed on [B*T, d_model] token rows
    (why: as_token_rows)."""
    c = self.config
    batch_shape, x = x.shape[:2], x.reshape(-1, x.shape[-1])
    dense = functools.partial(nn.Dense, dtype=c.dtype, param_dtype=c.param_dtype,
                              use_bias=c.use_bias)
    up = dense(c.d_ff, kernel_init=_init(c.init_std, ("embed", "mlp")),
               bias_init=_zeros(("mlp",)), name="up")(x)
    if c.mlp == "swiglu":
      gate = dense(c.d_ff, kernel_init=_init(c.init_std, ("embed", "mlp")),
                   bias_init=_zeros(("mlp",)), name="gate")(x)
      hidden = nn.silu(gate) * up
    else:
      hidden = nn.gelu(up, approximate=(c.mlp == "gelu_tanh"))
    hidden = constrain(hidden, ("batch", "act_heads"))
    out = dense(c.d_model, kernel_init=_init(c.init_std, ("mlp", "embed")),
                bias_init=_zeros(("embed",)), name="down")(hidden)
    return out.reshape(batch_shape + out.shape[1:])


class Block(nn.Module):
  """One transformer layer; `(h, cache) -> (h, cache)` so it can be scanned.

  With `read`, the output holds only the read positions (see the module docstring).
  """
  config: TransformerConfig

  @nn.compact
  def __call__(self, h, cache, positions, mask, cache_index, read: Read = None):
    c = self.config
    attn_out, cache = Attention(c, name="attn")(
        Norm(c, name="attn_norm")(h), positions, mask, cache, cache_index, read)
    h = read_positions(h, read)
    if c.parallel_residual:  # GPT-NeoX: h + attn(ln1(h)) + mlp(ln2(h))
      h = h + attn_out + Mlp(c, name="mlp")(Norm(c, name="mlp_norm")(h))
    else:
      h = h + attn_out
      h = h + Mlp(c, name="mlp")(Norm(c, name="mlp_norm")(h))
    return constrain(h, ("batch", "length", "act_embed")), cache


def _block_class(c: TransformerConfig):
  if c.remat == "none":
    return Block
  policy = (jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims
            if c.remat == "dots" else jax.checkpoint_policies.nothing_saveable)
  return nn.remat(Block, policy=policy, prevent_cse=not c.scan_layers)


class Transformer(nn.Module):
  """Embeddings -> blocks -> final norm. Returns hidden states [B, T, d_model]."""
  config: TransformerConfig

  def setup(self):
    c = self.config
    self.embed = nn.Embed(
        c.vocab_size, c.d_model, dtype=c.dtype, param_dtype=c.param_dtype,
        embedding_init=_init(c.init_std, ("vocab", "embed")), name="embed")
    if c.positions == "learned":
      self.pos_embed = nn.Embed(
          c.max_len, c.d_model, dtype=c.dtype, param_dtype=c.param_dtype,
          embedding_init=_init(c.init_std * 0.5, (None, "embed")), name="pos_embed")
    block = _block_class(c)
    if c.scan_layers:
      self.layers = nn.scan(
          block, variable_axes={"params": 0}, split_rngs={"params": True},
          in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=c.n_layers,
          metadata_params={nn.PARTITION_NAME: "layers"})(c, name="layers")
    else:
      self.layers = [block(c, name=f"layers_{i}") for i in range(c.n_layers)]
    self.final_norm = Norm(c, name="final_norm")

  def __call__(self, tokens, positions, mask, cache: Optional[Cache] = None,
               cache_index=None, read: Read = None):
    """Hidden states [B, T, d_model], or [B, Q, d_model] at the `read` positions."""
    c = self.config
    h = self.embed(tokens)
    if c.positions == "learned":
      h = h + self.pos_embed(positions)
    h = constrain(h, ("batch", "length", "act_embed"))
    if c.scan_layers:
      # Scanned layers are one traced body, so the last cannot run apart: every
      # layer runs at every position and the read positions are picked after.
      h, cache = self.layers(h, cache, positions, mask, cache_index)
      h = read_positions(h, read)
    else:
      new_cache = []
      for i, layer in enumerate(self.layers):
        last = i == len(self.layers) - 1
        h, layer_cache = layer(h, None if cache is None else cache[i], positions, mask,
                               cache_index, read if last else None)
        new_cache.append(layer_cache)
      cache = None if cache is None else new_cache
    return self.final_norm(h), cache

  def logits(self, h):
    """Tied models reuse the embedding; untied ones have their own `lm_head`."""
    return as_token_rows(self.embed.attend, h)


def init_cache(c: TransformerConfig, batch: int, length: int, dtype=None) -> Cache:
  """Zeroed KV cache: {'k','v'} of [B, Hkv, S, Dh] per layer.

  A list with one dict per layer, so each layer's decode step reads and writes its
  own buffer in place; stacked into one {'k','v'}: [L, B, Hkv, S, Dh] when the
  layers are scanned (`scan_layers`), where the scan slices it per layer. Heads
  come before slots, so attention reads each head's keys as one [S, Dh] matrix.
  """
  dtype = c.dtype if dtype is None else dtype
  shape = (batch, c.n_kv_heads, length, c.head_dim)
  if c.scan_layers:
    shape = (c.n_layers,) + shape
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
  return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
          for _ in range(c.n_layers)]


CACHE_SLOT_AXIS = -2  # the S axis of every cache array, stacked or not


def write_cache(cache: LayerCache, index, k: jax.Array, v: jax.Array) -> LayerCache:
  """Writes k, v [B, T, Hkv, Dh] at slots index..index+T-1 of one layer's cache."""
  def write(buffer, new):
    return jax.lax.dynamic_update_slice_in_dim(
        buffer, new.swapaxes(1, 2).astype(buffer.dtype), index, axis=2)
  return {"k": write(cache["k"], k), "v": write(cache["v"], v)}


def read_positions(x: jax.Array, read: Read) -> jax.Array:
  """The `read` positions of x [B, T, ...] (axis 1), or x itself for read=None.

  A static (start, length) slice costs nothing. Indices [B, Q] select with a one-hot
  contraction rather than a gather: it partitions over a sharded batch like any
  batched matmul (a gather here makes GSPMD replicate the activations), and its
  gradient is another small matmul, not a scatter.
  """
  if read is None:
    return x
  if isinstance(read, tuple):
    start, length = read
    return jax.lax.slice_in_dim(x, start, start + length, axis=1)
  one_hot = read[..., None] == jnp.arange(x.shape[1])  # [B, Q, T]
  if not jnp.issubdtype(x.dtype, jnp.floating):
    return jnp.sum(jnp.where(one_hot, x[:, None], 0), axis=2)
  return jnp.einsum("bqt,bt...->bq...", one_hot.astype(x.dtype), x)


def _read_slots(length: int, read: Read) -> jax.Array:
  """Positions [1 or B, Q] of the queries that `read` keeps among `length` tokens."""
  if read is None:
    return jnp.arange(length)[None]
  if isinstance(read, tuple):
    start, size = read
    return jnp.arange(start, start + size)[None]
  return read


def positions_from_mask(mask: jax.Array) -> jax.Array:
  """Position of each token counted over real tokens only (left padding -> 0)."""
  return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0).astype(jnp.int32)
