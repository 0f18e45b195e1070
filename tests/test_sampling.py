"""The KV-cache sampler: log-probs, greedy, top-k/top-p, stop tokens, sharding."""
import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from rlhf_jax import sampling, sharding
from rlhf_jax.models import heads
from tests.models.model_fixtures import init_params, left_padded_prompts, tiny_config

STOP = 3


def teacher_forced_logprobs(model, params, prompt, prompt_mask, samples, temperature):
  logits = heads.response_logits(model, params, prompt, prompt_mask, samples.tokens,
                                 samples.mask)
  logp = jax.nn.log_softmax(logits / temperature, axis=-1)
  return jnp.take_along_axis(logp, samples.tokens[..., None], axis=-1)[..., 0] * samples.mask


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_sampled_logprobs_equal_teacher_forced_on_data_parallel_mesh(family):
  """PPO's ratio is only right if these agree: same tokens, same temperature."""
  model = heads.PolicyModel(tiny_config(family))
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2)))
  params, _ = sharding.init_sharded(
      lambda r: model.init(r, jnp.ones((1, 4), jnp.int32))["params"], jax.random.key(0),
      mesh)
  prompt, prompt_mask = left_padded_prompts(batch=8, length=6, seed=5)
  batch = sharding.batch_sharding(mesh)
  prompt, prompt_mask = jax.device_put((prompt, prompt_mask), batch)
  params_sp = sampling.SamplingParams(new_tokens=10, stop_token=STOP, temperature=0.7)
  with jax.set_mesh(mesh):
    samples = sampling.make_sampler(model, params_sp)(params, prompt, prompt_mask,
                                                      jax.random.key(1))
    reference = jax.jit(teacher_forced_logprobs, static_argnums=(0, 5))(
        model, params, prompt, prompt_mask, samples, 0.7)
  assert samples.tokens.sharding.spec[0] is not None  # the batch stayed split
  np.testing.assert_allclose(np.asarray(samples.logprobs), np.asarray(reference),
                             atol=1e-5)
  assert np.all(np.asarray(samples.logprobs)[np.asarray(samples.mask) == 0] == 0)


@pytest.mark.parametrize("shape, batch", [((2, 2, 2), 8), ((8, 1, 1), 8), ((1, 8, 1), 8),
                                          ((8, 1, 1), 3)])
def test_sharded_samples_equal_single_device_samples(shape, batch):
  """On a purely data-parallel mesh (8, 1, 1) each device decodes its rows in its own
  loop and stops on its own; the other meshes, and a batch that does not divide
  over the devices, run one loop over the batch. Either way the samples must be
  those of one device for the same key."""
  model = heads.PolicyModel(tiny_config("gpt2"))
  data, fsdp, tensor = shape
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=data, fsdp=fsdp,
                                                           tensor=tensor)))
  params, _ = sharding.init_sharded(
      lambda r: model.init(r, jnp.ones((1, 4), jnp.int32))["params"], jax.random.key(0),
      mesh)
  prompt, prompt_mask = left_padded_prompts(batch=batch, length=6, seed=5)
  params_sp = sampling.SamplingParams(new_tokens=12, stop_token=STOP, temperature=1.5)
  single = sampling.make_sampler(model, params_sp)(jax.device_get(params), prompt,
                                                   prompt_mask, jax.random.key(1))
  if batch % data == 0:
    prompt, prompt_mask = jax.device_put((prompt, prompt_mask), sharding.batch_sharding(mesh))
  with jax.set_mesh(mesh):
    sharded = sampling.make_sampler(model, params_sp)(params, prompt, prompt_mask,
                                                      jax.random.key(1))
  # Some rows stop early and some run to the end, so devices finish at different steps.
  lengths = np.asarray(single.mask).sum(axis=1)
  assert lengths.min() < 12 and lengths.max() == 12
  np.testing.assert_array_equal(np.asarray(sharded.tokens), np.asarray(single.tokens))
  np.testing.assert_array_equal(np.asarray(sharded.mask), np.asarray(single.mask))
  np.testing.assert_allclose(np.asarray(sharded.logprobs), np.asarray(single.logprobs),
                             atol=1e-5)
  np.testing.assert_allclose(np.asarray(sharded.entropy), np.asarray(single.entropy),
                             atol=1e-5)


def test_greedy_matches_a_plain_reference_loop():
  model = heads.PolicyModel(tiny_config("llama"))
  params = init_params(model)
  prompt, prompt_mask = left_padded_prompts(batch=3, length=5, seed=7)
  params_sp = sampling.SamplingParams(new_tokens=6, stop_token=-1, greedy=True)
  samples = sampling.make_sampler(model, params_sp)(params, prompt, prompt_mask,
                                                    jax.random.key(0))
  # No cache: re-run the whole sequence each step. A fixed-size buffer whose unused
  # tail is masked keeps this to one compilation (causality hides the tail anyway).
  forward = jax.jit(lambda t, m: model.apply({"params": params}, t, m))
  tokens = np.concatenate([np.asarray(prompt), np.zeros((3, 6), np.int32)], axis=1)
  mask = np.concatenate([np.asarray(prompt_mask), np.zeros((3, 6), np.int32)], axis=1)
  for step in range(6):
    logits = forward(tokens, mask)
    tokens[:, 5 + step] = np.argmax(np.asarray(logits[:, 4 + step]), axis=-1)
    mask[:, 5 + step] = 1
  np.testing.assert_array_equal(np.asarray(samples.tokens), tokens[:, 5:])


def test_responses_are_truncated_after_the_first_stop_token():
  tokens = jnp.array([[5, STOP, 7, STOP, 9], [STOP, 5, 6, 7, 8], [5, 6, 7, 8, 9]])
  np.testing.assert_array_equal(sampling.truncate_after_stop(tokens, STOP),
                                [[1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
  # Greedy decoding is deterministic: make the token row 0 emits third the stop
  # token, and row 0 must end there with padding after it.
  model = heads.PolicyModel(tiny_config("gpt2"))
  params = init_params(model)
  prompt, prompt_mask = left_padded_prompts(batch=4, length=5, seed=2)
  free = sampling.make_sampler(model, sampling.SamplingParams(
      new_tokens=6, stop_token=-1, greedy=True))(params, prompt, prompt_mask,
                                                  jax.random.key(0))
  stop = int(free.tokens[0, 2])
  samples = sampling.make_sampler(model, sampling.SamplingParams(
      new_tokens=6, stop_token=stop, pad_token=0, greedy=True))(
          params, prompt, prompt_mask, jax.random.key(0))
  expected_mask = np.asarray(sampling.truncate_after_stop(free.tokens, stop))
  assert expected_mask[0].sum() <= 3 and expected_mask[0, 3:].sum() == 0
  np.testing.assert_array_equal(samples.mask, expected_mask)
  np.testing.assert_array_equal(samples.tokens, np.where(expected_mask, free.tokens, 0))
  assert np.all(np.asarray(samples.logprobs)[expected_mask == 0] == 0)


def _draw(logits, params_sp, n=4000):
  keys = jax.random.split(jax.random.key(0), n)
  batch = jnp.broadcast_to(logits, (1,) + logits.shape)
  choose = jax.jit(jax.vmap(
      lambda k: sampling._choose(batch, sampling.row_uniforms(k, 1), params_sp)[0][0]))
  return np.asarray(choose(keys))


def test_top_k_and_top_p_restrict_the_support():
  probs = np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
  logits = jnp.log(jnp.asarray(probs))
  base = sampling.SamplingParams(new_tokens=1, stop_token=-1, temperature=1.0)
  free = _draw(logits, base)
  assert set(np.unique(free)) == set(range(6))  # all six tokens occur unrestricted
  top2 = _draw(logits, sampling.SamplingParams(1, -1, temperature=1.0, top_k=2))
  assert set(np.unique(top2)) == {0, 1}
  # Renormalised over the top 2: P(0) = 0.4 / 0.65 ~= 0.615 (4000 draws, ~4 sigma).
  assert abs(np.mean(top2 == 0) - 0.4 / 0.65) < 0.031
  # Nucleus 0.7: tokens whose preceding mass is < 0.7 -> {0, 1, 2} (0.4, 0.65, ...).
  nucleus = _draw(logits, sampling.SamplingParams(1, -1, temperature=1.0, top_p=0.7))
  assert set(np.unique(nucleus)) == {0, 1, 2}
  assert abs(np.mean(nucleus == 2) - 0.15 / 0.8) < 0.03
  # The unrestricted frequencies follow the distribution.
  np.testing.assert_allclose(np.bincount(free, minlength=6) / len(free), probs, atol=0.03)


def test_two_level_draw_follows_softmax_across_ragged_blocks():
  # 37 entries in blocks of 8: five blocks, the last one padded; -inf entries
  # (some at block edges, one block entirely) must never be drawn.
  rng = np.random.default_rng(0)
  logits = rng.normal(size=37) * 1.5
  logits[[0, 7, 8, 9, 10, 11, 12, 13, 14, 15, 36]] = -np.inf
  probs = np.exp(logits - logits[np.isfinite(logits)].max())
  probs /= probs.sum()
  keys = jax.random.split(jax.random.key(0), 20000)
  draws = np.asarray(jax.jit(jax.vmap(
      lambda k: sampling.draw_categorical(k, jnp.asarray(logits)[None], block=8)[0]))(keys))
  freq = np.bincount(draws, minlength=37) / len(draws)
  assert freq[probs == 0].sum() == 0
  # Binomial standard error <= 0.0036 per entry at 20,000 draws: 0.015 is ~4 sigma.
  np.testing.assert_allclose(freq, probs, atol=0.015)
  # A single finite entry is drawn every time, wherever it sits.
  for only in (0, 8, 36):
    one_hot = jnp.full((1, 37), -jnp.inf).at[0, only].set(0.0)
    assert set(np.asarray(jax.vmap(lambda k: sampling.draw_categorical(
        k, one_hot, block=8)[0])(keys[:500])).tolist()) == {only}


def test_no_recompiles_for_new_data_of_the_same_shape():
  model = heads.PolicyModel(tiny_config("gpt2"))
  params = init_params(model)
  sp = sampling.SamplingParams(new_tokens=4, stop_token=STOP)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def forward(p, t, m):
    return model.apply({"params": p}, t, m)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def sample(p, t, m, rng):
    return sampling.sample(model, p, t, m, rng, sp)

  for seed in range(3):
    prompt, prompt_mask = left_padded_prompts(batch=2, length=5, seed=seed)
    forward(params, prompt, prompt_mask)
    sample(params, prompt, prompt_mask, jax.random.key(seed))
