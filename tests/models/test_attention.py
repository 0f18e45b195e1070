"""Both attention forms against a per-head reference; the hand-written backward
against autodiff of that reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.models import attention


def reference_attention(q, keys, values, allowed):
  """softmax(q_h k_h^T / sqrt(Dh) over the allowed keys) v_h, one head at a time."""
  b, t, h, dh = q.shape
  kv_heads = keys.shape[1]
  outs = []
  for head in range(h):
    kv = head // (h // kv_heads)  # query heads share key heads in consecutive groups
    scores = jnp.einsum("btd,bsd->bts", q[:, :, head], keys[:, kv]) / np.sqrt(dh)
    probs = jax.nn.softmax(jnp.where(allowed, scores, -jnp.inf), axis=-1)
    outs.append(jnp.einsum("bts,bsd->btd", probs, values[:, kv]))
  return jnp.stack(outs, axis=2)


def make_inputs(seed, batch=3, queries=5, keys_len=7, heads=4, kv_heads=4, head_dim=8,
                dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(batch, queries, heads, head_dim))
  k = rng.normal(size=(batch, kv_heads, keys_len, head_dim))
  v = rng.normal(size=(batch, kv_heads, keys_len, head_dim))
  allowed = rng.random((batch, queries, keys_len)) < 0.6
  allowed[:, np.arange(queries), np.arange(queries)] = True  # every row sees a key
  return (jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype),
          jnp.asarray(allowed))


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("form", ["block_attention", "decode_attention"])
def test_attention_equals_per_head_reference(form, kv_heads):
  q, k, v, allowed = make_inputs(0, kv_heads=kv_heads)
  got = getattr(attention, form)(q, k, v, allowed)
  np.testing.assert_allclose(got, reference_attention(q, k, v, allowed), atol=1e-5)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_full_pass_gradients_equal_autodiff_of_the_reference(kv_heads):
  q, k, v, allowed = make_inputs(1, kv_heads=kv_heads)
  d_out = jnp.asarray(np.random.default_rng(2).normal(size=q.shape), jnp.float32)

  def loss(fn):
    return lambda q, k, v: jnp.sum(fn(q, k, v, allowed) * d_out)

  got = jax.jit(jax.grad(loss(attention.block_attention), argnums=(0, 1, 2)))(q, k, v)
  want = jax.grad(loss(reference_attention), argnums=(0, 1, 2))(q, k, v)
  for name, g, w in zip(("dq", "dk", "dv"), got, want):
    np.testing.assert_allclose(g, w, atol=1e-5, err_msg=name)


def test_full_pass_gradients_keep_the_input_dtypes():
  q, k, v, allowed = make_inputs(3, kv_heads=2, dtype=jnp.bfloat16)
  grads = jax.grad(lambda q, k, v: jnp.sum(
      attention.block_attention(q, k, v, allowed).astype(jnp.float32)),
      argnums=(0, 1, 2))(q, k, v)
  assert [g.dtype for g in grads] == [jnp.bfloat16] * 3
  want = jax.grad(lambda q, k, v: jnp.sum(reference_attention(q, k, v, allowed)),
                  argnums=(0, 1, 2))(*(x.astype(jnp.float32) for x in (q, k, v)))
  for g, w in zip(grads, want):
    np.testing.assert_allclose(g.astype(jnp.float32), w, atol=0.1, rtol=0.05)
