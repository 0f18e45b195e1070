"""Model forward passes: KV-cache decoding against full forward, heads, configs."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.errors import ConfigError
from rlhf_jax.models import heads
from rlhf_jax.models.transformer import (Transformer, TransformerConfig, init_cache,
                                         positions_from_mask)
from tests.models.model_fixtures import (FAMILIES, init_params, left_padded_prompts,
                                         tiny_config, with_scan)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scan", [False, True])
def test_cached_decode_equals_full_forward(family, scan):
  """Prefill + one-token-at-a-time decoding gives the full pass's logits everywhere."""
  config = tiny_config(family)
  config = with_scan(config) if scan else config
  model = heads.PolicyModel(config)
  params = init_params(model)
  prompt, prompt_mask = left_padded_prompts(batch=4, length=7, seed=1)
  response = jax.random.randint(jax.random.key(2), (4, 5), 4, 64)
  tokens, mask = heads.join_prompt_response(prompt, prompt_mask, response,
                                            jnp.ones_like(response))
  full = model.apply({"params": params}, tokens, mask)

  n = response.shape[1]
  # One jitted function serves the prefill (7 tokens) and every 1-token step.
  run = jax.jit(lambda p, t, m, pos, cache, index: model.apply(
      {"params": p}, t, m, pos, cache=cache, cache_index=index))
  cache = init_cache(config, 4, 7 + n)
  slot_mask = mask  # every generated slot is real
  logits, cache = run(params, prompt, slot_mask, positions_from_mask(prompt_mask), cache, 0)
  decoded = [logits]
  next_pos = prompt_mask.sum(-1)
  for i in range(n):
    step_logits, cache = run(params, response[:, i:i + 1], slot_mask,
                             (next_pos + i)[:, None], cache, 7 + i)
    decoded.append(step_logits)
  decoded = jnp.concatenate(decoded, axis=1)
  real = np.asarray(mask, bool)
  np.testing.assert_allclose(np.asarray(decoded)[real], np.asarray(full)[real],
                             atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padding_does_not_change_real_outputs(family):
  """A prompt's logits do not depend on how much padding precedes it."""
  model = heads.PolicyModel(tiny_config(family))
  params = init_params(model)
  tokens = jnp.array([[5, 6, 7, 8]])
  padded = jnp.array([[0, 0, 0, 5, 6, 7, 8]])
  a = model.apply({"params": params}, tokens, jnp.ones_like(tokens))
  b = model.apply({"params": params}, padded, (padded > 0).astype(jnp.int32))
  np.testing.assert_allclose(a[0], b[0, 3:], atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_scan_and_unrolled_layers_agree(family):
  config = tiny_config(family)
  unrolled = heads.PolicyModel(config)
  scanned = heads.PolicyModel(with_scan(config))
  params = init_params(unrolled)
  # Stack layers_{i} into the scanned layout [L, ...].
  layers = [params["trunk"].pop(f"layers_{i}") for i in range(config.n_layers)]
  scanned_params = dict(params, trunk=dict(
      params["trunk"], layers=jax.tree.map(lambda *xs: jnp.stack(xs), *layers)))
  tokens, mask = left_padded_prompts(3, 6)
  for i, layer in enumerate(layers):
    params["trunk"][f"layers_{i}"] = layer
  np.testing.assert_allclose(unrolled.apply({"params": params}, tokens, mask),
                             scanned.apply({"params": scanned_params}, tokens, mask),
                             atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_reading_some_positions_equals_the_full_pass_there(family):
  """`read` runs the last layer at fewer positions; values and gradients match the
  full pass indexed afterwards, for a static slice and for per-row indices."""
  config = tiny_config(family, n_layers=3)
  model = heads.ScalarModel(config)
  params = init_params(model)
  tokens, mask = left_padded_prompts(4, 9, seed=3)
  index = jnp.array([[8, 2], [5, 8], [3, 3], [7, 6]])
  reads = {"slice": ((3, 4), lambda v: v[:, 3:7]),
           "index": (index, lambda v: jnp.take_along_axis(v, index, axis=1))}
  for name, (read, pick) in reads.items():
    def loss(p, read=read):
      return jnp.sum(jnp.sin(model.apply({"params": p}, tokens, mask, read=read)))

    def full_loss(p, pick=pick):
      return jnp.sum(jnp.sin(pick(model.apply({"params": p}, tokens, mask))))

    (got, got_grad), (want, want_grad) = (jax.value_and_grad(f)(params)
                                          for f in (loss, full_loss))
    np.testing.assert_allclose(got, want, atol=1e-5, err_msg=name)
    # Some gradient entries are ~100 in size: float32 rounding of the two matmul
    # orders is then above the absolute 1e-5, so allow a relative 1e-6 as well.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-6,
                                                         err_msg=name),
                 got_grad, want_grad)


@pytest.mark.parametrize("family", FAMILIES)
def test_reading_no_position_still_fills_the_whole_cache(family):
  """A prefill that reads nothing writes the same keys and values as a full one."""
  config = tiny_config(family)
  trunk = Transformer(config)
  params = {"params": init_params(heads.PolicyModel(config))["trunk"]}
  tokens, mask = left_padded_prompts(3, 6, seed=4)
  positions = positions_from_mask(mask)
  h, nothing_read = trunk.apply(params, tokens, positions, mask, init_cache(config, 3, 6), 0,
                                read=(0, 0))
  _, full = trunk.apply(params, tokens, positions, mask, init_cache(config, 3, 6), 0)
  assert h.shape == (3, 0, config.d_model)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), nothing_read, full)


def test_reward_is_read_at_last_real_token():
  config = tiny_config("gpt2")
  model = heads.RewardModel(config)
  params = init_params(model)
  tokens = jnp.array([[0, 5, 6, 3, 0, 0], [7, 8, 9, 10, 11, 3]])
  mask = jnp.array([[0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
  per_position = heads.ScalarModel(config).apply({"params": params}, tokens, mask)
  rewards = model.apply({"params": params}, tokens, mask)
  np.testing.assert_allclose(rewards, [per_position[0, 3], per_position[1, 5]], atol=1e-6)
  # gain and bias act affinely on the head output.
  shifted = dict(params, gain=jnp.float32(2.0), bias=jnp.float32(0.5))
  np.testing.assert_allclose(model.apply({"params": shifted}, tokens, mask),
                             2.0 * rewards + 0.5, atol=1e-5)


def test_value_and_reward_share_one_param_tree():
  config = tiny_config("llama")
  value_params = init_params(heads.ValueModel(config))
  reward_params = init_params(heads.RewardModel(config), seed=1)
  assert jax.tree.structure(value_params) == jax.tree.structure(reward_params)
  tokens, mask = left_padded_prompts(2, 5)
  values = heads.ValueModel(config).apply({"params": reward_params}, tokens, mask)
  assert values.shape == (2, 5) and values.dtype == jnp.float32


def test_families_have_their_defining_features():
  gpt2, llama, neox = (tiny_config(f) for f in FAMILIES)
  gpt2_params = init_params(heads.PolicyModel(gpt2))
  llama_params = init_params(heads.PolicyModel(llama))
  assert "pos_embed" in gpt2_params["trunk"] and "lm_head" not in gpt2_params  # tied
  assert "lm_head" in llama_params and "pos_embed" not in llama_params["trunk"]
  llama_layer = llama_params["trunk"]["layers_0"]
  assert set(llama_layer["mlp"]) == {"gate", "up", "down"}
  assert llama_layer["attn"]["k"]["kernel"].shape == (32, 2, 8)  # 2 kv heads (GQA)
  assert "bias" not in llama_layer["attn_norm"]["norm"]  # RMSNorm
  assert neox.parallel_residual and neox.rotary_pct == 0.25


def test_bad_model_config_names_the_field():
  with pytest.raises(ConfigError, match=r"config.model.family: 'gpt5'"):
    TransformerConfig.from_config(dict(family="gpt5"))
  with pytest.raises(ConfigError, match=r"config.model.n_kv_heads"):
    TransformerConfig.from_config(dict(family="llama", n_heads=4, n_kv_heads=3))


def test_bfloat16_compute_keeps_float32_params_and_outputs():
  config = dataclasses.replace(tiny_config("llama"), dtype=jnp.bfloat16)
  model = heads.PolicyModel(config)
  params = init_params(model)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  tokens, mask = left_padded_prompts(2, 5)
  assert model.apply({"params": params}, tokens, mask).dtype == jnp.float32
