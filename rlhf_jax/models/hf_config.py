"""Hugging Face `config.json` <-> TransformerConfig, for models/hf.py.

GPT-2, Llama and GPT-NeoX configs name the same architecture facts differently
(n_embd / hidden_size, layer_norm_epsilon / rms_norm_eps, rotary_pct ...); this
module is the one place that translates them, and that refuses settings our trunk
does not implement (RoPE scaling, odd head_dim, ...) instead of loading them wrong.
"""
from __future__ import annotations

import re

import jax.numpy as jnp

from rlhf_jax.errors import ConfigError
from rlhf_jax.models.transformer import TransformerConfig

MODEL_TYPES = {"gpt2": "gpt2", "llama": "llama", "gpt_neox": "neox"}
_HF_MODEL_TYPE = {v: k for k, v in MODEL_TYPES.items()}
_ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM",
                  "neox": "GPTNeoXForCausalLM"}
# Buffers some checkpoints carry that are not parameters.
_IGNORED = re.compile(r"(^|\.)(attn\.bias|attn\.masked_bias|attention\.bias|"
                      r"attention\.masked_bias|rotary_emb\.inv_freq)$")
# Fields that are runtime choices, not part of the checkpoint's architecture.
RUNTIME_FIELDS = ("dtype", "param_dtype", "remat", "scan_layers", "max_len")


# --------------------------------------------------------------------------- configs


def _rope_params(hf: dict, family: str) -> tuple[float, float]:
  """(theta, rotary fraction) from a v5 `rope_parameters` dict or the v4 fields."""
  rope = dict(hf.get("rope_parameters") or {})
  scaling = hf.get("rope_scaling") or {}
  rope_type = rope.get("rope_type", rope.get("type")) or scaling.get(
      "rope_type", scaling.get("type")) or "default"
  if rope_type != "default":
    raise ConfigError(f"{family} checkpoint uses rope_type={rope_type!r}; only the default "
                      "(unscaled) RoPE is implemented")
  theta = rope.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))
  pct = rope.get("partial_rotary_factor",
                 hf.get("partial_rotary_factor",
                        hf.get("rotary_pct", 0.25 if family == "neox" else 1.0)))
  return float(theta), float(pct)


def _mlp_from_act(act: str, where: str) -> str:
  if act in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
    return "gelu_tanh"
  if act == "gelu":
    return "gelu"
  raise ConfigError(f"{where}={act!r} is not supported (gelu, gelu_new)")


def transformer_config_from_hf(hf: dict, **runtime) -> TransformerConfig:
  """Our TransformerConfig from an HF config.json dict, plus runtime fields.

  `runtime` may set dtype, param_dtype, remat, scan_layers and max_len (for learned
  positions at most the checkpoint's table).
  """
  bad = set(runtime) - set(RUNTIME_FIELDS)
  if bad:
    raise ConfigError(f"not runtime fields: {sorted(bad)} (allowed: {RUNTIME_FIELDS})")
  model_type = hf.get("model_type")
  if model_type not in MODEL_TYPES:
    raise ConfigError(f"config.json model_type {model_type!r} is not one of "
                      f"{sorted(MODEL_TYPES)}")
  family = MODEL_TYPES[model_type]
  if family == "gpt2":
    if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx"):
      raise ConfigError("gpt2 checkpoint: only scale_attn_weights=True and "
                        "scale_attn_by_inverse_layer_idx=False are supported")
    if hf.get("add_cross_attention"):
      raise ConfigError("gpt2 checkpoint: cross-attention is not supported")
    d = hf["n_embd"]
    values = dict(
        vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["n_layer"],
        n_heads=hf["n_head"], n_kv_heads=hf["n_head"], d_ff=hf.get("n_inner") or 4 * d,
        max_len=hf["n_positions"], norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), positions="learned",
        mlp=_mlp_from_act(hf.get("activation_function", "gelu_new"), "activation_function"),
        use_bias=True, tied_embeddings=hf.get("tie_word_embeddings", True),
        parallel_residual=False)
  elif family == "llama":
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, d // heads):
      raise ConfigError(f"llama checkpoint: head_dim={hf['head_dim']} != hidden_size / "
                        f"num_attention_heads = {d // heads} is not supported")
    if hf.get("hidden_act", "silu") != "silu":
      raise ConfigError(f"llama checkpoint: hidden_act={hf['hidden_act']!r} (need silu)")
    attn_bias, mlp_bias = bool(hf.get("attention_bias")), bool(hf.get("mlp_bias"))
    if attn_bias != mlp_bias:
      raise ConfigError("llama checkpoint: attention_bias != mlp_bias is not supported "
                        "(one use_bias flag)")
    theta, pct = _rope_params(hf, family)
    values = dict(
        vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["num_hidden_layers"],
        n_heads=heads, n_kv_heads=hf.get("num_key_value_heads") or heads,
        d_ff=hf["intermediate_size"], max_len=hf.get("max_position_embeddings", 2048),
        norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6), positions="rope",
        rope_theta=theta, rotary_pct=pct, mlp="swiglu", use_bias=attn_bias,
        tied_embeddings=bool(hf.get("tie_word_embeddings", False)), parallel_residual=False)
  else:  # neox
    if not hf.get("attention_bias", True):
      raise ConfigError("gpt_neox checkpoint: attention_bias=False is not supported")
    theta, pct = _rope_params(hf, family)
    heads = hf["num_attention_heads"]
    values = dict(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"], n_heads=heads, n_kv_heads=heads,
        d_ff=hf["intermediate_size"], max_len=hf.get("max_position_embeddings", 2048),
        norm="layernorm", norm_eps=hf.get("layer_norm_eps", 1e-5), positions="rope",
        rope_theta=theta, rotary_pct=pct,
        mlp=_mlp_from_act(hf.get("hidden_act", "gelu"), "hidden_act"), use_bias=True,
        tied_embeddings=bool(hf.get("tie_word_embeddings", False)),
        parallel_residual=bool(hf.get("use_parallel_residual", True)))
  max_len = runtime.pop("max_len", None)
  if max_len is not None:
    if family == "gpt2" and max_len > values["max_len"]:
      raise ConfigError(f"max_len={max_len} exceeds the checkpoint's n_positions="
                        f"{values['max_len']}")
    values["max_len"] = max_len
  runtime = {k: v for k, v in runtime.items() if v is not None}
  runtime["dtype"] = jnp.dtype(runtime.get("dtype", "float32"))
  runtime["param_dtype"] = jnp.dtype(runtime.get("param_dtype", "float32"))
  config = TransformerConfig(family=family, **values, **runtime)
  config.validate()
  return config


def _hf_config(c: TransformerConfig, dtype_name: str) -> dict:
  """config.json for `c` (raises if `c` is not expressible in its HF family)."""
  defaults = dict(norm="layernorm", positions="learned", mlp=("gelu_tanh", "gelu"),
                  use_bias=True, parallel_residual=False, n_kv_heads=c.n_heads)
  if c.family == "llama":
    defaults = dict(norm="rmsnorm", positions="rope", mlp=("swiglu",),
                    parallel_residual=False)
  elif c.family == "neox":
    defaults = dict(norm="layernorm", positions="rope", mlp=("gelu_tanh", "gelu"),
                    use_bias=True, n_kv_heads=c.n_heads)
  for field, want in defaults.items():
    have = getattr(c, field)
    if (have not in want) if isinstance(want, tuple) else (have != want):
      raise ConfigError(f"cannot export family {c.family} with {field}={have!r} to HF "
                        f"(needs {want!r})")
  common = dict(model_type=_HF_MODEL_TYPE[c.family], architectures=[_ARCHITECTURES[c.family]],
                vocab_size=c.vocab_size, tie_word_embeddings=c.tied_embeddings,
                dtype=dtype_name, use_cache=True)
  if c.family == "gpt2":
    return dict(common, n_embd=c.d_model, n_layer=c.n_layers, n_head=c.n_heads,
                n_inner=c.d_ff, n_positions=c.max_len,
                activation_function="gelu_new" if c.mlp == "gelu_tanh" else "gelu",
                layer_norm_epsilon=c.norm_eps, resid_pdrop=0.0, embd_pdrop=0.0,
                attn_pdrop=0.0, scale_attn_weights=True,
                scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False,
                bos_token_id=None, eos_token_id=None)
  rope = dict(rope_type="default", rope_theta=c.rope_theta)
  common.update(hidden_size=c.d_model, num_hidden_layers=c.n_layers,
                num_attention_heads=c.n_heads, intermediate_size=c.d_ff,
                max_position_embeddings=c.max_len, bos_token_id=None, eos_token_id=None)
  if c.family == "llama":
    if c.rotary_pct != 1.0:
      rope["partial_rotary_factor"] = c.rotary_pct
    return dict(common, num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim,
                hidden_act="silu", rms_norm_eps=c.norm_eps, rope_parameters=rope,
                rope_theta=c.rope_theta, attention_bias=c.use_bias, mlp_bias=c.use_bias,
                attention_dropout=0.0)
  rope["partial_rotary_factor"] = c.rotary_pct
  return dict(common, hidden_act="gelu_new" if c.mlp == "gelu_tanh" else "gelu",
              layer_norm_eps=c.norm_eps, rope_parameters=rope, rotary_pct=c.rotary_pct,
              rotary_emb_base=c.rope_theta, use_parallel_residual=c.parallel_residual,
              attention_bias=True, attention_dropout=0.0, hidden_dropout=0.0)
