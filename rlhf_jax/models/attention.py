"""Softmax attention for XLA's CPU backend: one form for decoding, one for blocks of queries.

Both take queries q [B, T, H, Dh], keys and values [B, Hkv, S, Dh] (H a multiple of
Hkv: grouped-query heads) and `allowed` [B, T, S] (bool), and return [B, T, H, Dh].
Scores and the softmax are float32 whatever the compute dtype. On an accelerator
the transformer calls `jax.nn.dot_product_attention` for full passes instead, and
`decode_attention` for cached ones.

Written for XLA's CPU backend, where the layout of each batched dot decides its
speed: a batched dot whose operands contract over their last axis (or the
second-to-last of the right-hand one) runs through YNNPACK, fused with the softmax
around it; other layouts fall back to a slower loop of small matmuls, and XLA
inserts transposes around dots with other output layouts. Both forms scale q rather
than the [T, S] scores and add the mask as a bias that fuses into the softmax
rather than a select.

`decode_attention` keeps q's [B, T, H, Dh] layout: with one query per row (a decode
step) that is the form the sampler measured fastest. `block_attention`, for
several queries per row (training and scoring passes, the reward model's responses
over its cached prompt, a prefill), moves the heads in front of the positions once,
so that every dot of its forward and of its hand-written backward is a plain
batched matmul. On a 2-core Xeon: forward + backward of [32, 128, 4, 64] queries
over 256 keys 42-44 -> 32-36 ms; the benchmark RM step 720-723 -> 652-656 ms, then
615-630 -> 586-593 ms with dK and dV computed as in `_contract_rows` (BENCHMARKS.md).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

# Masked scores become finfo.min (never -inf: a finite score plus it rounds back to
# it), whose exp is exactly 0. A query always sees at least its own key (the
# transformer makes sure), so no row is all masked.
_MASKED = jnp.finfo(jnp.float32).min


def _mask_bias(allowed: jax.Array) -> jax.Array:
  return jnp.where(allowed, 0.0, _MASKED)


def decode_attention(q: jax.Array, keys: jax.Array, values: jax.Array,
                     allowed: jax.Array) -> jax.Array:
  """Attention in q's own [B, T, H, Dh] layout: decode steps (one query per row),
  and on an accelerator every cached pass."""
  b, t, h, dh = q.shape
  kv_heads = keys.shape[1]
  q = q * jnp.asarray(1.0 / dh ** 0.5, q.dtype)
  bias = _mask_bias(allowed)[:, None]  # [B, 1, T, S]
  if kv_heads == h:
    scores = jnp.einsum("bthd,bhsd->bhts", q, keys, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(scores + bias, axis=-1).astype(values.dtype)
    return jnp.einsum("bhts,bhsd->bthd", probs, values)
  q = q.reshape(b, t, kv_heads, h // kv_heads, dh)
  scores = jnp.einsum("btkgd,bksd->bkgts", q, keys, preferred_element_type=jnp.float32)
  probs = jax.nn.softmax(scores + bias[:, :, None], axis=-1).astype(values.dtype)
  out = jnp.einsum("bkgts,bksd->btkgd", probs, values)
  return out.reshape(b, t, h, dh)


def _heads_first(q: jax.Array, kv_heads: int) -> jax.Array:
  """[B, T, H, Dh] -> [B, Hkv, G * T, Dh]: a key head's G query heads, one after the
  other, as rows of one matrix."""
  b, t, h, dh = q.shape
  groups = h // kv_heads
  q = q.reshape(b, t, kv_heads, groups, dh).transpose(0, 2, 3, 1, 4)
  return q.reshape(b, kv_heads, groups * t, dh)


def _heads_last(x: jax.Array, t: int) -> jax.Array:
  """The inverse of _heads_first: [B, Hkv, G * T, Dh] -> [B, T, H, Dh]."""
  b, kv_heads, rows, dh = x.shape
  groups = rows // t
  x = x.reshape(b, kv_heads, groups, t, dh).transpose(0, 3, 1, 2, 4)
  return x.reshape(b, t, kv_heads * groups, dh)


def _grouped_bias(allowed: jax.Array, groups: int) -> jax.Array:
  """allowed [B, T, S] -> bias [B, 1, G * T, S], rows ordered as _heads_first's."""
  bias = _mask_bias(allowed)[:, None]
  return jnp.tile(bias, (1, 1, groups, 1)) if groups > 1 else bias


def _forward(q, keys, values, allowed):
  """(out [B, T, H, Dh], what the backward needs)."""
  t, h, dh = q.shape[1:]
  kv_heads = keys.shape[1]
  scale = jnp.asarray(1.0 / dh ** 0.5, q.dtype)
  qh = _heads_first(q * scale, kv_heads)  # [B, Hkv, G*T, Dh]
  scores = jnp.einsum("bkrd,bksd->bkrs", qh, keys, preferred_element_type=jnp.float32)
  probs = jax.nn.softmax(scores + _grouped_bias(allowed, h // kv_heads), axis=-1)
  probs = probs.astype(values.dtype)
  out = jnp.einsum("bkrs,bksd->bkrd", probs, values)
  return _heads_last(out, t), (qh, keys, values, probs)


@jax.custom_vjp
def block_attention(q: jax.Array, keys: jax.Array, values: jax.Array,
                    allowed: jax.Array) -> jax.Array:
  """Attention for several queries per row, heads first inside.

  The same outputs as `decode_attention` (to float rounding); its gradient is the
  softmax attention backward written out as batched matmuls of the same layout
  (dP = dO V^T, dS = P * (dP - rowsum(dP * P)), dQ = dS K / sqrt(Dh), dK = dS^T Q,
  dV = P^T dO), instead of what autodiff derives from the [B, T, H, Dh] form.
  """
  return _forward(q, keys, values, allowed)[0]


def _block_bwd(residuals, d_out):
  qh, keys, values, probs = residuals  # qh is already scaled by 1/sqrt(Dh)
  t, _, dh = d_out.shape[1:]
  kv_heads = keys.shape[1]
  d_rows = _heads_first(d_out, kv_heads)  # [B, Hkv, G*T, Dh]
  d_probs = jnp.einsum("bkrd,bksd->bkrs", d_rows, values, preferred_element_type=jnp.float32)
  p32 = probs.astype(jnp.float32)
  d_scores = p32 * (d_probs - jnp.sum(d_probs * p32, axis=-1, keepdims=True))
  d_scores = d_scores.astype(qh.dtype)
  d_values = _contract_rows(d_rows.astype(probs.dtype), probs)  # P^T dO
  d_keys = _contract_rows(qh, d_scores)  # dS^T Q
  d_q = jnp.einsum("bkrs,bksd->bkrd", d_scores, keys) * jnp.asarray(1.0 / dh ** 0.5, qh.dtype)
  return (_heads_last(d_q, t), d_keys.astype(keys.dtype), d_values.astype(values.dtype),
          None)


def _contract_rows(x: jax.Array, weights: jax.Array) -> jax.Array:
  """weights^T x over the query rows: x [B, Hkv, R, Dh], weights [B, Hkv, R, S] -> [B, Hkv, S, Dh].

  Contracting both operands over their second-to-last axis is a layout XLA's CPU
  backend runs as a loop of small matmuls (2x slower than YNNPACK's batched matmul
  at these sizes). So it is computed as (x^T weights)^T, with x^T [B, Hkv, Dh, R]
  and the [B, Hkv, Dh, S] product laid out in memory as written: the optimization
  barriers stop XLA from folding the two transposes back into the dot (on the
  2-core Xeon the benchmark RM step 615-630 -> 586-593 ms).
  """
  barrier = jax.lax.optimization_barrier
  x_t = barrier(x.swapaxes(2, 3))
  return barrier(jnp.einsum("bkdr,bkrs->bkds", x_t, weights)).swapaxes(2, 3)


block_attention.defvjp(_forward, _block_bwd)
