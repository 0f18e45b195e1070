"""Jitted sampling with a KV cache: one prefill pass, then one token per step.

`sample` takes left-padded prompts of mixed lengths, runs them through the policy
once to fill the cache, then decodes a fixed number of new tokens inside a
`lax.while_loop` that writes one cache slot per step and stops early once every row
has produced its stop token (every row of the device, on a purely data-parallel
mesh; see `sample`). Shapes are static, so one compilation serves every batch.

Each response is truncated after its first stop token: the returned mask is 1 up to
and including it, and the tokens after it are padding. The log-probs are those of
the sampled tokens under `log_softmax(logits / temperature)` over the *whole*
vocabulary -- exactly what a teacher-forced forward pass at the same temperature
computes, which is what PPO's ratio needs. (Top-k / top-p only restrict which tokens
can be drawn; like most RLHF code, the log-probs are not renormalised over that set.)
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from rlhf_jax import losses
from rlhf_jax.models.heads import PolicyModel
from rlhf_jax.models.transformer import init_cache, positions_from_mask


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  new_tokens: int
  stop_token: int
  pad_token: int = 0
  temperature: float = 0.7
  top_k: int = 0      # 0: no top-k restriction
  top_p: float = 1.0  # 1.0: no nucleus restriction
  greedy: bool = False

  @classmethod
  def from_config(cls, rollout_config, *, stop_token: int, pad_token: int):
    return cls(new_tokens=int(rollout_config.new_tokens), stop_token=stop_token,
               pad_token=pad_token, temperature=float(rollout_config.temperature),
               top_k=int(rollout_config.top_k), top_p=float(rollout_config.top_p),
               greedy=bool(rollout_config.get("greedy", False)))


class Samples(NamedTuple):
  tokens: jax.Array    # [B, N] int32, padding after the stop token
  mask: jax.Array      # [B, N] int32, 1 up to and including the first stop token
  logprobs: jax.Array  # [B, N] float32, 0 where mask is 0
  entropy: jax.Array   # [B, N] float32, of each step's distribution; 0 where mask is 0


def restrict_logits(logits: jax.Array, top_k: int, top_p: float) -> jax.Array:
  """Sets logits outside the top-k / nucleus (top-p) set to -inf."""
  if top_k and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # Keep each token whose preceding mass is below p (the first always stays).
    n_keep = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)
    threshold = jnp.take_along_axis(sorted_logits, n_keep - 1, axis=-1)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return logits


def truncate_after_stop(tokens: jax.Array, stop_token: int) -> jax.Array:
  """Mask that is 1 up to and including the first stop token of each row."""
  is_stop = (tokens == stop_token).astype(jnp.int32)
  stops_before = jnp.cumsum(is_stop, axis=-1) - is_stop
  return (stops_before == 0).astype(jnp.int32)


def _block_size(vocab: int) -> int:
  """A divisor of the vocabulary near its square root (no padding), else 128."""
  root = int(vocab ** 0.5)
  for delta in range(root // 2):
    for size in (root + delta, root - delta):
      if size > 1 and vocab % size == 0:
        return size
  return 128


def row_uniforms(rng: jax.Array, rows: int) -> jax.Array:
  """One uniform in (0, 1] per row, [rows, 1]: what `draw_with_uniforms` inverts."""
  return jax.random.uniform(rng, (rows, 1), minval=jnp.finfo(jnp.float32).tiny, maxval=1.0)


def draw_categorical(rng: jax.Array, logits: jax.Array, block: int = 0) -> jax.Array:
  """One token per row from softmax(logits); see `draw_with_uniforms`."""
  return draw_with_uniforms(row_uniforms(rng, logits.shape[0]), logits, block)


def draw_with_uniforms(uniforms: jax.Array, logits: jax.Array, block: int = 0) -> jax.Array:
  """One token per row from softmax(logits), by inverting the CDF in two levels.

  `jax.random.categorical` draws a Gumbel variate per vocabulary entry; here each
  row needs one uniform (`uniforms`, [B, 1] in (0, 1]). The vocabulary is cut into
  blocks: pick the block from the running sum of block masses, then the token from
  the running sum inside it, so the scans are over V / block and block entries
  instead of V (a 6x cheaper draw than Gumbel-max at vocab 8000 on CPU). Entries at
  -inf are never drawn: a token is taken only where its running sum crosses the
  uniform.
  """
  batch, vocab = logits.shape
  block = block or _block_size(vocab)
  n_blocks = -(-vocab // block)
  weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
  weights = jnp.pad(weights, ((0, 0), (0, n_blocks * block - vocab)))
  weights = weights.reshape(batch, n_blocks, block)
  block_cdf = jnp.cumsum(jnp.sum(weights, axis=-1), axis=-1)  # [B, n_blocks]
  # u in (0, total]: strictly positive, so a zero-mass prefix is never chosen.
  u = uniforms * block_cdf[:, -1:]
  chosen = jnp.minimum(jnp.sum(block_cdf < u, axis=-1), n_blocks - 1)  # [B]
  mass_before = jnp.where(chosen[:, None] > 0, jnp.take_along_axis(
      block_cdf, jnp.maximum(chosen[:, None] - 1, 0), axis=-1), 0.0)
  inside = jnp.take_along_axis(weights, chosen[:, None, None], axis=1)[:, 0]  # [B, block]
  inside_cdf = jnp.cumsum(inside, axis=-1)
  offset = jnp.sum(inside_cdf < u - mass_before, axis=-1)
  # Rounding can leave the uniform past the block's own running total: take the
  # block's last token that can be drawn.
  last_drawable = block - 1 - jnp.argmax(inside[:, ::-1] > 0, axis=-1)
  return chosen * block + jnp.minimum(offset, last_drawable)


def _choose(logits, uniforms, params: SamplingParams):
  """Picks the next token; returns it, its log-prob and the entropy at the temperature.

  `uniforms` [B, 1] (from `row_uniforms`) drive the draw; greedy ignores them.
  """
  scaled = logits.astype(jnp.float32) / params.temperature
  if params.greedy:
    token = jnp.argmax(logits, axis=-1)
  else:
    token = draw_with_uniforms(uniforms, restrict_logits(scaled, params.top_k, params.top_p))
  logprob = jnp.take_along_axis(jax.nn.log_softmax(scaled, axis=-1), token[:, None],
                                axis=-1)[:, 0]
  return token.astype(jnp.int32), logprob, losses.entropy_from_logits(scaled)


def sample(policy: PolicyModel, params, prompt_tokens: jax.Array, prompt_mask: jax.Array,
           rng: jax.Array, sampling: SamplingParams) -> Samples:
  """Samples `sampling.new_tokens` tokens after each prompt (pure; jit it).

  Under a purely data-parallel mesh (`jax.set_mesh`; data > 1, every other axis 1),
  each device decodes its own rows in its own loop (`jax.shard_map` over `data`): it
  stops when its own rows are done, and the early-stop test is not an all-reduce
  across every device after every token (on a 2-core CPU split into two devices,
  that test cost about 3% of sampling). Other meshes, and batches that do not divide
  over the devices, run one loop over the whole batch (XLA 0.10's SPMD partitioner
  aborts on the embedding gather of a shard_map that leaves fsdp or tensor axes
  automatic). The draws do not depend on the mesh: each device takes its rows'
  slice of the same per-token uniforms.
  """
  mesh = jax.sharding.get_abstract_mesh()
  decode = functools.partial(_sample_rows, policy, sampling=sampling,
                             total_rows=prompt_tokens.shape[0])
  if not _one_loop_per_device(mesh, prompt_tokens.shape[0]):
    return decode(params, prompt_tokens, prompt_mask, rng, first_row=0)

  def decode_rows(params, prompt_tokens, prompt_mask, rng):
    first_row = jax.lax.axis_index("data") * prompt_tokens.shape[0]
    return decode(params, prompt_tokens, prompt_mask, rng, first_row=first_row)

  rows = PartitionSpec("data")
  # Params are never split over `data` (sharding.LOGICAL_AXIS_RULES): each device
  # holds them whole. check_vma=False: the loop carries start replicated and become
  # per-device, which the varying-axes checker would reject.
  return jax.shard_map(decode_rows, mesh=mesh, in_specs=(PartitionSpec(), rows, rows,
                                                          PartitionSpec()),
                       out_specs=rows, axis_names={"data"}, check_vma=False)(
                           params, prompt_tokens, prompt_mask, rng)


def _one_loop_per_device(mesh, rows: int) -> bool:
  """Whether `mesh` splits only the batch (data > 1, every other axis 1) and the
  `rows` divide evenly over it (shard_map needs equal rows per device; the one loop
  over the batch does not)."""
  if mesh.empty or "data" not in mesh.axis_names or "data" in mesh.manual_axes:
    return False
  data = mesh.shape["data"]
  return data > 1 and rows % data == 0 and all(
      size == 1 for axis, size in mesh.shape.items() if axis != "data")


def _sample_rows(policy: PolicyModel, params, prompt_tokens, prompt_mask, rng,
                 sampling: SamplingParams, total_rows: int, first_row) -> Samples:
  """`sample` for rows first_row .. first_row + len(prompt_tokens) of a batch of
  total_rows (all of it, or one device's part)."""
  batch, prompt_len = prompt_tokens.shape
  n = sampling.new_tokens
  prompt_mask = prompt_mask.astype(jnp.int32)
  cache = init_cache(policy.config, batch, prompt_len + n)
  # Every slot after the prompt will hold a generated token; causality hides the
  # ones not yet written.
  slot_mask = jnp.concatenate([prompt_mask, jnp.ones((batch, n), jnp.int32)], axis=1)
  apply = functools.partial(policy.apply, {"params": params})
  # Only the last prompt position's logits are used: skip the LM head elsewhere.
  logits, cache = apply(prompt_tokens, slot_mask, positions_from_mask(prompt_mask),
                        cache=cache, cache_index=0, logits_slice=(prompt_len - 1, 1))
  next_position = jnp.sum(prompt_mask, axis=-1).astype(jnp.int32)  # [B]

  rngs = jax.random.split(rng, n)

  def uniforms(i):  # these rows' part of token i's uniforms
    return jax.lax.dynamic_slice_in_dim(row_uniforms(rngs[i], total_rows), first_row, batch)

  token, logprob, entropy = _choose(logits[:, -1], uniforms(0), sampling)
  tokens = jnp.full((batch, n), sampling.pad_token, jnp.int32).at[:, 0].set(token)
  logprobs = jnp.zeros((batch, n), jnp.float32).at[:, 0].set(logprob)
  entropies = jnp.zeros((batch, n), jnp.float32).at[:, 0].set(entropy)
  done = token == sampling.stop_token
  mask = jnp.zeros((batch, n), jnp.int32).at[:, 0].set(1)

  def keep_going(state):
    i, done = state[0], state[-2]
    return (i < n) & ~jnp.all(done)

  def step(state):
    i, cache, token, tokens, logprobs, entropies, done, mask = state
    # Feed token i - 1 at its cache slot, then choose token i.
    positions = (next_position + i - 1)[:, None]
    logits, cache = apply(token[:, None], slot_mask, positions, cache=cache,
                          cache_index=prompt_len + i - 1)
    token, logprob, entropy = _choose(logits[:, 0], uniforms(i), sampling)
    live = ~done
    tokens = tokens.at[:, i].set(jnp.where(live, token, sampling.pad_token))
    logprobs = logprobs.at[:, i].set(jnp.where(live, logprob, 0.0))
    entropies = entropies.at[:, i].set(jnp.where(live, entropy, 0.0))
    mask = mask.at[:, i].set(live.astype(jnp.int32))
    done = done | (token == sampling.stop_token)
    return i + 1, cache, token, tokens, logprobs, entropies, done, mask

  state = (jnp.int32(1), cache, token, tokens, logprobs, entropies, done, mask)
  _, _, _, tokens, logprobs, entropies, _, mask = jax.lax.while_loop(keep_going, step, state)
  return Samples(tokens=tokens, mask=mask, logprobs=logprobs, entropy=entropies)


def make_sampler(policy: PolicyModel, sampling: SamplingParams):
  """`sample` jitted for one policy and one set of sampling parameters.

  Called as `sampler(params, prompt_tokens, prompt_mask, rng)`; inputs keep their
  shardings (params sharded by the mesh, prompts split over the batch).
  """
  return jax.jit(functools.partial(sample, policy, sampling=sampling))
