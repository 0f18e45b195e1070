"""HF checkpoint import/export against transformers' own models (nothing downloaded).

Tiny GPT-2, Llama (grouped-query attention) and GPT-NeoX models are built by
transformers from configs, every parameter (biases and norm scales included) is
randomised so a wrong mapping cannot hide behind a zero or a one, and they are saved
with transformers' own save_pretrained.
"""
import os
import pickle

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from rlhf_jax import sharding  # noqa: E402
from rlhf_jax.errors import ConfigError  # noqa: E402
from rlhf_jax.models import hf  # noqa: E402
from rlhf_jax.models.transformer import positions_from_mask  # noqa: E402

FAMILIES = ("gpt2", "llama", "neox")
VOCAB = 96
TOL = 1e-4


def _hf_model(family: str):
  """A tiny transformers model with non-default numerics fields where they exist."""
  if family == "gpt2":
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4, n_inner=48,
        layer_norm_epsilon=1e-4, bos_token_id=None, eos_token_id=None)
    model = transformers.GPT2LMHeadModel(config)
  elif family == "llama":
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-5, rope_theta=500.0, bos_token_id=None, eos_token_id=None)
    model = transformers.LlamaForCausalLM(config)
  else:
    config = transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64, rotary_pct=0.5,
        rotary_emb_base=300.0, layer_norm_eps=1e-4, bos_token_id=None, eos_token_id=None)
    model = transformers.GPTNeoXForCausalLM(config)
  with torch.no_grad():
    for name, p in model.named_parameters():
      is_scale = p.ndim == 1 and ("norm" in name or ".ln_" in name)
      p.normal_(1.0 if is_scale and name.endswith("weight") else 0.0, 0.2)
  return model.eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """{family: (transformers model, checkpoint dir)}."""
  torch.manual_seed(0)
  out = {}
  for family in FAMILIES:
    model = _hf_model(family)
    path = str(tmp_path_factory.mktemp(family))
    model.save_pretrained(path)
    out[family] = (model, path)
  return out


def _tokens(batch=3, length=9, seed=0):
  return np.random.default_rng(seed).integers(0, VOCAB, (batch, length)).astype(np.int32)


def _left_padded(seed=1):
  tokens = _tokens(seed=seed)
  real = np.array([9, 5, 2])
  mask = (np.arange(9)[None, :] >= (9 - real)[:, None]).astype(np.int32)
  return tokens * mask, mask


def _torch_logits(model, tokens, mask=None):
  kwargs = {}
  if mask is not None:
    kwargs = dict(attention_mask=torch.tensor(mask, dtype=torch.long),
                  position_ids=torch.tensor(np.asarray(positions_from_mask(mask)),
                                            dtype=torch.long))
  with torch.no_grad():
    return model(torch.tensor(tokens, dtype=torch.long), **kwargs).logits.numpy()


def _mesh():
  return sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2)))


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(checkpoints, family):
  model, path = checkpoints[family]
  policy, params = hf.load_pretrained(path)
  assert policy.config.family == family
  # One compile serves both batches (eager op-by-op apply is far slower on CPU).
  apply = jax.jit(lambda p, t, m: policy.apply({"params": p}, t, m))
  tokens = _tokens()
  logits = np.asarray(apply(params, jnp.asarray(tokens), jnp.ones(tokens.shape, jnp.int32)))
  want = _torch_logits(model, tokens)
  assert logits.shape == (3, 9, VOCAB) and logits.dtype == np.float32
  assert np.abs(want).max() > 1.0  # the comparison is not between near-zero numbers
  np.testing.assert_allclose(logits, want, atol=TOL, rtol=0)

  # Left-padded batch: compare at the real tokens (padding rows are never read).
  tokens, mask = _left_padded()
  logits = np.asarray(apply(params, jnp.asarray(tokens), jnp.asarray(mask)))
  want = _torch_logits(model, tokens, mask)
  real = mask.astype(bool)
  np.testing.assert_allclose(logits[real], want[real], atol=TOL, rtol=0)


def test_sharded_index_checkpoint_loads(checkpoints, tmp_path):
  """transformers' own sharded save (index.json) gives the single-file params."""
  model, path = checkpoints["llama"]
  model.save_pretrained(str(tmp_path), max_shard_size="20KB")
  files = os.listdir(tmp_path)
  assert hf.INDEX_FILE in files and hf.SINGLE_FILE not in files
  assert sum(f.endswith(".safetensors") for f in files) > 1
  _, params = hf.load_pretrained(str(tmp_path))
  _, single = hf.load_pretrained(path)
  jax.tree.map(np.testing.assert_array_equal, params, single)


def _unstack(params, n_layers):
  trunk = dict(params["trunk"])
  stacked = trunk.pop("layers")
  for i in range(n_layers):
    trunk[f"layers_{i}"] = jax.tree.map(lambda x, i=i: np.asarray(x)[i], stacked)
  return dict(params, trunk=trunk)


@pytest.mark.parametrize("family", FAMILIES)
def test_load_onto_2x2x2_mesh(checkpoints, family, monkeypatch):
  """Sharded, layer-stacked loading: the single-device params, read shard by shard.

  No read of a fused / q attention weight covers more than half of it, and the
  sharded model gives transformers' logits (one family: each mesh compile is slow).
  """
  model, path = checkpoints[family]
  reads = []
  original = hf._Checkpoint.read

  def spy(self, name, slices):
    out = original(self, name, slices)
    reads.append((name, out.size))
    return out

  monkeypatch.setattr(hf._Checkpoint, "read", spy)
  mesh = _mesh()
  policy, params = hf.load_pretrained(path, mesh=mesh, scan_layers=True)
  q = params["trunk"]["layers"]["attn"]["q"]["kernel"]
  assert q.shape == (2, 32, 4, 8)
  assert q.sharding.mesh.shape == mesh.shape
  assert {s.data.shape for s in q.addressable_shards} == {(2, 16, 2, 8)}
  full = {"gpt2": 32 * 96, "llama": 32 * 32, "neox": 96 * 32}[family]
  attn_reads = [size for name, size in reads
                if name.endswith(("c_attn.weight", "q_proj.weight", "query_key_value.weight"))]
  assert attn_reads and max(attn_reads) <= full // 2
  monkeypatch.undo()
  _, single = hf.load_pretrained(path)
  jax.tree.map(np.testing.assert_array_equal, _unstack(params, 2), single)

  if family == "llama":
    tokens = _tokens(batch=4, seed=4)
    with jax.set_mesh(mesh):
      logits = jax.jit(lambda p, t: policy.apply({"params": p}, t))(params,
                                                                     jnp.asarray(tokens))
    np.testing.assert_allclose(np.asarray(logits), _torch_logits(model, tokens), atol=TOL,
                               rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_checkpoint_loads_in_transformers(checkpoints, family, tmp_path):
  model, path = checkpoints[family]
  policy, params = hf.load_pretrained(path)
  hf.save_pretrained(policy, params, str(tmp_path))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
  assert type(reloaded) is type(model)
  tokens = _tokens(seed=5)
  np.testing.assert_allclose(_torch_logits(reloaded, tokens), _torch_logits(model, tokens),
                             atol=1e-6, rtol=0)


def test_save_from_mesh_sharded_files_round_trip(checkpoints, tmp_path):
  """Stacked params on a mesh -> several files + index -> transformers and back."""
  model, path = checkpoints["neox"]
  policy, params = hf.load_pretrained(path, mesh=_mesh(), scan_layers=True)
  hf.save_pretrained(policy, params, str(tmp_path), max_shard_bytes=16_000)
  files = os.listdir(tmp_path)
  assert hf.INDEX_FILE in files and sum(f.endswith(".safetensors") for f in files) > 1
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
  tokens = _tokens(seed=6)
  np.testing.assert_allclose(_torch_logits(reloaded, tokens), _torch_logits(model, tokens),
                             atol=1e-6, rtol=0)
  _, again = hf.load_pretrained(str(tmp_path), scan_layers=True)
  jax.tree.map(np.testing.assert_array_equal, again, params)


def test_config_mismatch_and_unsupported_features_raise(checkpoints):
  _, path = checkpoints["llama"]
  config = hf.transformer_config_from_checkpoint(path)
  assert (config.n_kv_heads, config.rope_theta, config.norm_eps) == (2, 500.0, 1e-5)
  import dataclasses
  with pytest.raises(ConfigError, match="d_ff"):
    hf.load_pretrained_params(path, dataclasses.replace(config, d_ff=64))
  neox = hf.transformer_config_from_checkpoint(checkpoints["neox"][1])
  assert (neox.rotary_pct, neox.rope_theta, neox.parallel_residual) == (0.5, 300.0, True)
  hf_config = hf.read_hf_config(path)
  with pytest.raises(ConfigError, match="rope_type"):
    hf.transformer_config_from_hf(dict(hf_config, rope_parameters=dict(
        rope_type="llama3", rope_theta=5e5, factor=8.0)))
  with pytest.raises(ConfigError, match="head_dim"):
    hf.transformer_config_from_hf(dict(hf_config, head_dim=16))
  gpt2 = hf.read_hf_config(checkpoints["gpt2"][1])
  with pytest.raises(ConfigError, match="scale_attn"):
    hf.transformer_config_from_hf(dict(gpt2, scale_attn_by_inverse_layer_idx=True))
  with pytest.raises(ConfigError, match="model_type"):
    hf.transformer_config_from_hf(dict(gpt2, model_type="bert"))


def test_init_from_hook_and_bfloat16(checkpoints, tmp_path):
  """config.model.init_from picks the checkpoint's architecture; bf16 files read/write."""
  model, path = checkpoints["neox"]
  model_config = ml_collections.ConfigDict(dict(
      family="gpt2", vocab_size=8000, d_model=256, n_layers=4, n_heads=4, n_kv_heads=4,
      d_ff=1024, max_len=48, dtype="float32", param_dtype="float32", remat="full",
      scan_layers=False, rope_theta=None, norm_eps=None, init_from=path))
  config = hf.transformer_config_for(model_config)
  assert (config.family, config.d_model, config.max_len, config.remat) == ("neox", 32, 48,
                                                                          "full")
  assert hf.transformer_config_for(dict(model_config, init_from="")).d_model == 256

  import copy
  half = copy.deepcopy(model).to(torch.bfloat16)
  half.save_pretrained(str(tmp_path / "bf16"))
  params = hf.load_pretrained_params(str(tmp_path / "bf16"), config)
  want = half.gpt_neox.embed_in.weight.float().detach().numpy()
  got = params["trunk"]["embed"]["embedding"]
  assert got.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(got), want)

  policy, params = hf.load_pretrained(path)
  hf.save_pretrained(policy, params, str(tmp_path / "out"), dtype="bfloat16")
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
  assert reloaded.gpt_neox.embed_in.weight.dtype == torch.bfloat16
  np.testing.assert_array_equal(reloaded.gpt_neox.embed_in.weight.float().detach().numpy(),
                                want)


# ------------------------------------------------------------------ tokenizers


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  texts = ["Human: what is the capital of France?\n\nAssistant: Paris.",
           "TL;DR: the cat sat on the mat", "1234 numbers and    spaces\ttabs"] * 20
  tok.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<blank>", "<eot>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  path = tmp_path_factory.mktemp("tok")
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, eos_token="<eot>", pad_token="<blank>")
  fast.save_pretrained(str(path))
  return str(path), fast


def test_hf_tokenizer_matches_transformers(tokenizer_dir):
  from rlhf_jax.data.hf_tokenizer import HFTokenizer, load_tokenizer
  path, fast = tokenizer_dir
  tok = load_tokenizer(path)
  assert isinstance(tok, HFTokenizer)
  # Unusual names: the ids can only come from the directory's tokenizer_config.json.
  assert (tok.eos_id, tok.pad_id) == (fast.eos_token_id, fast.pad_token_id) == (1, 0)
  text = "Human: where is the cat?\n\nAssistant: on the mat 42 \u00e9"
  ids = tok.encode(text)
  assert ids == fast.encode(text, add_special_tokens=False)
  assert tok.decode(ids + [tok.pad_id] * 3) == text
  assert tok.encode_batch([text, "cat"]) == [ids, tok.encode("cat")]
  tokens, mask, truncated = tok.pad_prompts([ids, tok.encode("cat")], 8)
  assert tokens.shape == (2, 8) and list(truncated) == [len(ids) > 8, False]
  assert tokens[1, 0] == tok.pad_id and mask[1].sum() == len(tok.encode("cat"))
  tokens, mask, _ = tok.pad_responses([tok.encode("cat")], 6)
  assert tokens[0, mask[0].sum() - 1] == tok.eos_id
  again = pickle.loads(pickle.dumps(tok))
  assert again.encode(text) == ids and again.fingerprint == tok.fingerprint


def test_hf_tokenizer_special_tokens_must_be_known(tokenizer_dir):
  from rlhf_jax.data.hf_tokenizer import HFTokenizer
  path, _ = tokenizer_dir
  with open(os.path.join(path, "tokenizer.json")) as f:
    raw = f.read()
  with pytest.raises(ValueError, match="EOS"):
    HFTokenizer(raw)
  with pytest.raises(ValueError, match="pad"):
    HFTokenizer(raw, eos_token="<eot>")
  with pytest.raises(ValueError, match="pad"):
    HFTokenizer(raw, eos_token="<eot>", pad_token="<eot>")
  assert HFTokenizer(raw, eos_token="<eot>", pad_token="<blank>").pad_id == 0
  assert HFTokenizer(raw, eos_token="<eot>", pad_id=5).pad_id == 5
