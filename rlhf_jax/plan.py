"""Will a config fit? Compile its steps ahead of time for N devices and read the bill.

  python -m rlhf_jax.plan --config configs/ppo_llama3_8b.py --num_devices 64 --chip v5p
  python -m rlhf_jax.plan --config configs/tldr_gpt2.py:rm --num_devices 4 --chip v4 \\
      --config.data.batch_size=128

The command fakes N CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=N,
set before jax is imported), builds the config's ('data', 'fsdp', 'tensor') mesh over
them, and compiles the stage's jitted functions exactly as the trainers build them --
same step factories, shardings and donation -- from abstract inputs only
(`jax.ShapeDtypeStruct`s with shardings, shapes from `jax.eval_shape`): no parameter
is ever allocated, so an 8B-parameter plan runs on a laptop.

  sft  the SFT train step            rm   the RM train step
  ppo  rollout/generate (KV-cache sampling), rollout/score (policy, reference, value
       and reward forwards + GAE), ppo/update (all epochs x minibatches)

Per function it prints the per-device memory of XLA's `memory_analysis()` --
arguments, outputs, aliased (donated) bytes, temporaries, generated code (0 on
the CPU backend) -- and,
for PPO, the bytes of the other networks that stay resident while that function
runs (the reference and reward params during the update, the optimizer states
during the rollout, ...). `peak` = args + out - alias + temp + code + other
resident; it is compared with the HBM of `--chip`.

FLOPs come from `cost_analysis()`. On the CPU backend XLA reports the partitioned
program, i.e. FLOPs *per device*; the table multiplies by N for the global figure.
XLA counts the body of a while loop once, so with `model.scan_layers` (a loop over
layers), gradient accumulation, PPO's epoch/minibatch scans or the sampler's decode
loop its figure is a lower bound; the analytic estimate beside it (6 x params per
trained token, 2 x params per forward token; attention not counted) is the one to
budget with.

Arguments, outputs and the resident networks are exact (shapes x shardings).
Temporaries are the CPU compiler's: TPU and GPU XLA fuse, schedule and
rematerialise differently, so treat them as estimates and leave headroom;
`fits` is simply peak <= HBM. Chips (HBM per device; a v4 or v5p chip is one
device): v4 32 GiB, v5e 16, v5p 95, v6e 32, h100 80, h200 141.
"""
from __future__ import annotations

import os
import re
import sys
import textwrap

_DEVICES_FLAG = re.compile(r"--num_devices(?:=(\d+))?$")


def _force_host_devices(argv: list[str]) -> None:
  """Sets the CPU device count from --num_devices before jax reads XLA_FLAGS.

  XLA reads its flags once, when jax first initialises a backend, so this must run
  before anything imports jax (hence it sits above the imports below).
  """
  for i, arg in enumerate(argv):
    match = _DEVICES_FLAG.match(arg)
    if match:
      value = match.group(1) or (argv[i + 1] if i + 1 < len(argv) else "")
      if value.isdigit() and int(value) > 0:
        flag = f"--xla_force_host_platform_device_count={value}"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
  # Always plan on the CPU compiler, even on a TPU VM or a GPU host.
  os.environ["JAX_PLATFORMS"] = "cpu"


if __name__ == "__main__":
  _force_host_devices(sys.argv)

import dataclasses  # noqa: E402
import functools  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from rlhf_jax import config_base, optim, sampling, sharding  # noqa: E402
from rlhf_jax.data import formats  # noqa: E402
from rlhf_jax.errors import ConfigError, UserError  # noqa: E402
from rlhf_jax.models import heads  # noqa: E402
from rlhf_jax.models.transformer import TransformerConfig  # noqa: E402
from rlhf_jax.steps import ppo as ppo_steps  # noqa: E402
from rlhf_jax.steps import rollout as rollout_lib  # noqa: E402
from rlhf_jax.trainers import common, supervised  # noqa: E402

GIB = 1024 ** 3

# HBM per device (one JAX device = one chip; v4 and v5p chips are megacore).
CHIP_HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32, "h100": 80, "h200": 141}

# Stand-in ids: the plan never tokenizes, and no shape depends on them.
_STOP_TOKEN, _PAD_TOKEN = 3, 0


@dataclasses.dataclass
class Compiled:
  """One compiled function's bill; bytes are per device, FLOPs per call."""
  name: str
  argument: int
  output: int
  alias: int
  temp: int
  code: int
  other_resident: int  # networks alive during this call but not its arguments
  xla_flops_per_device: float
  analytic_flops: float  # global
  compile_seconds: float

  @property
  def peak(self) -> int:
    return (self.argument + self.output - self.alias + self.temp + self.code
            + self.other_resident)


# --------------------------------------------------------------------------------
# Abstract inputs
# --------------------------------------------------------------------------------


def _struct(shape, dtype, sharding_) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding_)


def _bytes_per_device(tree: Any) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs with shardings."""
  def leaf(x):
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    return int(np.prod(shape, dtype=np.int64)) * x.dtype.itemsize
  return sum(leaf(x) for x in jax.tree.leaves(tree))


def _key(mesh) -> jax.ShapeDtypeStruct:
  key = jax.eval_shape(jax.random.key, 0)
  return _struct(key.shape, key.dtype, sharding.replicated(mesh))


def _batch(shapes: dict[str, tuple[tuple[int, ...], Any]], mesh) -> dict:
  """Leading axis split over the data-parallel axes, as sharding.shard_batch does."""
  return {k: _struct(shape, dtype, sharding.batch_sharding(mesh, len(shape)))
          for k, (shape, dtype) in shapes.items()}


def _demonstrations(b: int, p: int, r: int, mesh) -> dict:
  i32 = jnp.int32
  return _batch({"prompt_tokens": ((b, p), i32), "prompt_mask": ((b, p), i32),
                 "response_tokens": ((b, r), i32), "response_mask": ((b, r), i32),
                 "weight": ((b,), jnp.float32)}, mesh)


def _comparisons(b: int, k: int, p: int, r: int, mesh) -> dict:
  i32 = jnp.int32
  return _batch({"prompt_tokens": ((b, p), i32), "prompt_mask": ((b, p), i32),
                 "response_tokens": ((b, k, r), i32), "response_mask": ((b, k, r), i32),
                 "ranks": ((b, k), i32), "response_valid": ((b, k), i32),
                 "weight": ((b,), jnp.float32)}, mesh)


def model_config_of(config) -> tuple[TransformerConfig, list[str]]:
  """The model the trainers would build, and notes about how it was found.

  With `model.init_from` pointing at a checkpoint here, its architecture (as the
  trainers read it); otherwise `config.model`'s fields, whose vocabulary stands in
  for the tokenizer's.
  """
  path = config.model.get("init_from") or ""
  if path and os.path.exists(os.path.join(path, "config.json")):
    from rlhf_jax.models import hf  # safetensors etc. only when needed
    return hf.transformer_config_for(config.model), [f"architecture read from {path}"]
  notes = []
  if path:
    notes.append(f"model.init_from {path} is not here: planned with config.model's "
                 "fields (they must match the checkpoint)")
  return TransformerConfig.from_config(config.model), notes


# --------------------------------------------------------------------------------
# Compiling and reading the bill
# --------------------------------------------------------------------------------


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", 0.0))


def _compile(name: str, jitted, args: tuple, analytic_flops: float,
             other_resident: int = 0) -> Compiled:
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  seconds = time.perf_counter() - start
  m = compiled.memory_analysis()
  return Compiled(name=name, argument=m.argument_size_in_bytes,
                  output=m.output_size_in_bytes, alias=m.alias_size_in_bytes,
                  temp=m.temp_size_in_bytes, code=m.generated_code_size_in_bytes,
                  other_resident=other_resident, xla_flops_per_device=_flops(compiled),
                  analytic_flops=analytic_flops, compile_seconds=seconds)


def _total_steps(steps: int) -> int:
  """The schedule's length only shapes the learning rate, never memory."""
  return steps if steps > 0 else 1000


def _plan_supervised(config, mesh, model_config: TransformerConfig) -> list[Compiled]:
  """The SFT or RM train step, built as trainers/supervised.py builds it."""
  stage = supervised.SFT if config.stage == "sft" else supervised.RM
  supervised._check_batch_sizes(config, sharding.data_parallel_size(mesh))
  model = stage.model_cls(model_config)
  steps = _total_steps(config[stage.name].steps)
  tx, schedule = optim.make_optimizer(config.optim, steps)
  state_shardings = common.state_sharding(model, tx, mesh)
  state = common.abstract_state(model, tx, state_shardings, jax.random.key(0))
  d = config.data
  if stage is supervised.SFT:
    batch = _demonstrations(d.batch_size, d.prompt_len, d.response_len, mesh)
    tokens = d.batch_size * (d.prompt_len + d.response_len)
  else:
    if d.format not in formats.COMPARISON_FORMATS:
      raise ConfigError(f"config.data.format: the reward model trains on comparisons "
                        f"{formats.COMPARISON_FORMATS}, not {d.format!r}")
    k = {"hh": 2, "tldr": 2}.get(d.format, d.max_responses)
    batch = _comparisons(d.batch_size, k, d.prompt_len, d.response_len, mesh)
    # steps/reward.py encodes each prompt once and its K responses after it.
    tokens = d.batch_size * (d.prompt_len + k * d.response_len)
  replicated = sharding.replicated(mesh)
  step = jax.jit(stage.make_step(model, tx, schedule, config),
                 in_shardings=(state_shardings, sharding.batch_shardings(batch, mesh),
                               replicated),
                 out_shardings=(state_shardings, replicated), donate_argnums=(0,))
  flops = 6.0 * model_config.param_count() * tokens
  return [_compile(f"{stage.name}/train_step", step, (state, batch, _key(mesh)), flops)]


def _plan_ppo(config, mesh, model_config: TransformerConfig) -> list[Compiled]:
  """PPO's three jitted phases, from the factories in steps/rollout.py and steps/ppo.py.

  Four networks share the mesh: policy and value (each with Adam state), the
  frozen reference policy and the reward model; the critic has the RM's shape.
  """
  from rlhf_jax.trainers import ppo as ppo_trainer  # heavy: only for PPO plans
  ppo_trainer._check_sizes(config, sharding.data_parallel_size(mesh))
  b, p, n = config.ppo.batch_size, config.data.prompt_len, config.rollout.new_tokens
  policy, value = heads.PolicyModel(model_config), heads.ValueModel(model_config)
  reward = heads.RewardModel(model_config)
  policy_abstract, policy_sharding = common.param_sharding(policy, mesh)
  value_abstract, value_sharding = common.param_sharding(value, mesh)
  updates = (_total_steps(config.ppo.iterations) * config.ppo.epochs
             * config.ppo.minibatches)
  # As trainers/ppo.py: one optimizer definition, one state per network.
  policy_tx = value_tx = optim.make_optimizer(config.optim, updates)[0]
  up = ppo_steps.UpdateParams.from_config(config)
  replicated = sharding.replicated(mesh)
  state_sharding = ppo_steps.state_sharding(
      policy_tx, value_tx, policy_abstract, value_abstract, policy_sharding,
      value_sharding, replicated, ema=up.ema_decay > 0)
  state = jax.eval_shape(functools.partial(
      ppo_steps.init_state, policy_tx=policy_tx, value_tx=value_tx,
      ema_decay=up.ema_decay), policy_abstract, value_abstract)
  state = jax.tree.map(lambda x, s: _struct(x.shape, x.dtype, s), state, state_sharding)
  params = {"policy": policy_abstract, "reference": policy_abstract,
            "value": value_abstract, "reward": value_abstract}
  params_sharding = {"policy": policy_sharding, "reference": policy_sharding,
                     "value": value_sharding, "reward": value_sharding}

  # P(('data', 'fsdp')) splits the leading axis of an array of any rank.
  batch_sharding = sharding.batch_sharding(mesh, 1)
  fns = rollout_lib.make_rollout_fns(
      rollout_lib.Models(policy, value, reward),
      sampling.SamplingParams.from_config(config.rollout, stop_token=_STOP_TOKEN,
                                          pad_token=_PAD_TOKEN),
      rollout_lib.ScoringParams.from_config(config, stop_token=_STOP_TOKEN),
      params_sharding=params_sharding, batch_sharding=batch_sharding,
      replicated=replicated)
  i32, f32 = jnp.int32, jnp.float32
  prompts = _batch({"tokens": ((b, p), i32), "mask": ((b, p), i32)}, mesh)
  samples = sampling.Samples(*_batch({"tokens": ((b, n), i32), "mask": ((b, n), i32),
                                      "logprobs": ((b, n), f32),
                                      "entropy": ((b, n), f32)}, mesh).values())
  rollout_batch = _batch({k: ((b, p) if k.startswith("prompt") else (b, n),
                              i32 if k.endswith(("tokens", "mask")) else f32)
                          for k in rollout_lib.UPDATE_KEYS}, mesh)
  ptx, ptx_sharding = None, None
  if up.gamma_ptx:
    ptx_sharding = ppo_steps.ptx_sharding_for(mesh)
    shape = (up.epochs, config.ppo.minibatches, config.ppo.ptx_batch_size,
             config.data.text_len)
    ptx = {k: _struct(shape, i32, ptx_sharding) for k in ("tokens", "mask")}
  update = ppo_steps.make_update(policy, value, policy_tx, value_tx, up,
                                 state_sharding=state_sharding,
                                 batch_sharding=batch_sharding, ptx_sharding=ptx_sharding,
                                 replicated=replicated)

  size = _bytes_per_device
  resident = {"policy": size(state.policy), "policy_opt": size(state.policy_opt),
              "value": size(state.value), "value_opt": size(state.value_opt),
              "ema": size(state.ema), "reference": size(policy_abstract),
              "reward": size(value_abstract)}
  others = lambda *used: sum(v for k, v in resident.items() if k not in used)
  n_policy, n_value = model_config.param_count(), _scalar_model_params(model_config)
  seq = p + n
  beta = _struct((), f32, replicated)
  ptx_tokens = (0 if ptx is None else
                up.epochs * config.ppo.minibatches * config.ppo.ptx_batch_size
                * config.data.text_len)
  return [
      _compile("rollout/generate", fns.generate,
               (policy_abstract, prompts["tokens"], prompts["mask"], _key(mesh)),
               2.0 * n_policy * b * seq, others("policy")),
      _compile("rollout/score", fns.score,
               (params, prompts["tokens"], prompts["mask"], samples, beta),
               2.0 * (2 * n_policy + 2 * n_value) * b * seq,
               others("policy", "reference", "value", "reward")),
      _compile("ppo/update", update, (state, rollout_batch, ptx, _key(mesh)),
               6.0 * up.epochs * (n_policy + n_value) * b * seq
               + 6.0 * n_policy * ptx_tokens,
               others("policy", "policy_opt", "value", "value_opt", "ema")),
  ]


def _scalar_model_params(c: TransformerConfig) -> int:
  """Trunk + scalar head: the LM head (or the tied embedding's second use) is gone."""
  lm_head = 0 if c.tied_embeddings else c.vocab_size * c.d_model
  return c.param_count() - lm_head + c.d_model + 3


# --------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------


def plan(config: ml_collections.ConfigDict, num_devices: int, chip: str = "v5p") -> dict:
  """Compiles `config.stage`'s steps for `num_devices` devices; returns the bill.

  Uses the first `num_devices` of `jax.devices()` (the CLI fakes that many CPU
  devices). Raises ConfigError / UserError for mistakes a user can fix.

  Returns {'stage', 'num_devices', 'mesh', 'chip', 'hbm_bytes', 'params', 'notes',
  'functions': [{name, argument, output, alias, temp, code, other_resident, peak,
  xla_flops_per_device, xla_flops, analytic_flops, compile_seconds, fits}],
  'peak', 'fits'}; bytes are per device, FLOPs per call.
  """
  chip = chip.lower()
  if chip not in CHIP_HBM_GIB:
    raise ConfigError(f"--chip: {chip!r} is not one of {sorted(CHIP_HBM_GIB)}")
  if config.stage not in ("sft", "rm", "ppo"):
    raise ConfigError(f"config.stage: {config.stage!r}: plan one of sft, rm, ppo "
                      "(plan a pipeline stage by stage)")
  config_base.validate(config)
  devices = jax.devices()
  if num_devices > len(devices):
    raise UserError(f"--num_devices: {num_devices} asked but this process has "
                    f"{len(devices)} devices (the CLI sets XLA_FLAGS before jax starts)")
  mesh = sharding.make_mesh(config.mesh, devices[:num_devices])
  model_config, notes = model_config_of(config)
  with jax.set_mesh(mesh):
    if config.stage == "ppo":
      compiled = _plan_ppo(config, mesh, model_config)
    else:
      compiled = _plan_supervised(config, mesh, model_config)
  hbm = CHIP_HBM_GIB[chip] * GIB
  functions = []
  for c in compiled:
    f = dataclasses.asdict(c)
    f.update(peak=c.peak, xla_flops=c.xla_flops_per_device * num_devices,
             fits=c.peak <= hbm)
    functions.append(f)
  peak = max(f["peak"] for f in functions)
  return {"stage": config.stage, "num_devices": num_devices, "mesh": dict(mesh.shape),
          "chip": chip, "hbm_bytes": hbm, "params": model_config.param_count(),
          "model": model_config, "notes": notes, "functions": functions, "peak": peak,
          "fits": peak <= hbm}


def format_plan(result: dict) -> str:
  """The plan as the table the CLI prints (and config docstrings quote)."""
  # GiB at real scale; MiB for the tiny configs of tests and notebooks.
  unit, scale = ("GiB", GIB) if result["peak"] >= GIB else ("MiB", 1024 ** 2)
  amount = lambda x: f"{x / scale:7.2f}"
  m = result["model"]
  mesh = " ".join(f"{k}={v}" for k, v in result["mesh"].items())
  lines = [
      f"stage {result['stage']} on {result['num_devices']} devices, mesh {mesh}",
      f"model {m.family}, {result['params'] / 1e9:.3f}B params (trunk + LM head): "
      f"{m.n_layers} layers, d_model {m.d_model},",
      f"  compute {jnp.dtype(m.dtype).name}, params {jnp.dtype(m.param_dtype).name}, "
      f"remat {m.remat}, scan_layers {m.scan_layers}",
      *[textwrap.fill(n, 84, initial_indent="note: ", subsequent_indent="  ")
        for n in result["notes"]],
      f"per-device memory in {unit} (chip {result['chip']}: "
      f"{result['hbm_bytes'] / GIB:.0f} GiB HBM)",
      f"  {'function':<18}{'args':>8}{'out':>8}{'alias':>8}{'temp':>8}{'code':>8}"
      f"{'other':>8}{'peak':>8}  fits",
  ]
  for f in result["functions"]:
    lines.append(f"  {f['name']:<18}" + "".join(
        f" {amount(f[k])}" for k in ("argument", "output", "alias", "temp", "code",
                                   "other_resident", "peak"))
        + f"  {'yes' if f['fits'] else 'NO'}")
  lines += ["FLOPs per call, all devices (XLA: its per-device count x devices, loop",
            "bodies counted once; analytic: 6 x params x tokens trained, 2 x forward)"]
  for f in result["functions"]:
    lines.append(f"  {f['name']:<18} XLA {f['xla_flops']:.3e}  analytic "
                 f"{f['analytic_flops']:.3e}  compiled in {f['compile_seconds']:.0f} s")
  verdict = "fits" if result["fits"] else "does NOT fit"
  lines.append(f"peak {result['peak'] / GIB:.2f} GiB per device: {verdict} in "
               f"{result['chip']} HBM ({result['hbm_bytes'] / GIB:.0f} GiB)")
  return "\n".join(lines)


# --------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------


def main(argv, config_flag, num_devices_flag, chip_flag) -> None:
  if len(argv) > 1:
    print(f"error: unexpected arguments: {' '.join(argv[1:])}", file=sys.stderr)
    sys.exit(2)
  try:
    config = config_flag.value
    if config is None:
      raise UserError("--config is required")
    if not num_devices_flag.value or num_devices_flag.value <= 0:
      raise UserError("--num_devices: give a positive device count")
    result = plan(config, num_devices_flag.value, chip_flag.value)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  except OSError as e:  # ml_collections defers config-file load errors to here
    print(f"error: --config: {str(e).splitlines()[-1].strip()}", file=sys.stderr)
    sys.exit(1)
  print(format_plan(result))


def _parse_flags(argv):
  """absl parsing with flag and config-override mistakes as one line (exit 2), and
  a config file's own ConfigError (e.g. an unknown preset) as one line (exit 1)."""
  from absl import flags
  try:
    return flags.FLAGS(argv)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  except flags.Error as e:
    print(f"error: {e}", file=sys.stderr)
  except (AttributeError, KeyError, TypeError, ValueError, ImportError, OSError) as e:
    message = str(e).strip("'\"")
    print(f"error: bad --config: {message}", file=sys.stderr)
  sys.exit(2)


def run() -> None:
  from absl import app, flags
  from ml_collections import config_flags

  # Defined here, not at import: tests import this module beside rlhf_jax.train,
  # and absl flags may only be defined once per process.
  config_flag = config_flags.DEFINE_config_file(
      "config", None, "Config file, e.g. configs/ppo_llama3_8b.py", lock_config=True)
  num_devices_flag = flags.DEFINE_integer(
      "num_devices", None, "Devices to plan for (faked on the CPU).")
  chip_flag = flags.DEFINE_string(
      "chip", "v5p", f"HBM to compare with: one of {sorted(CHIP_HBM_GIB)}.")
  app.run(lambda argv: main(argv, config_flag, num_devices_flag, chip_flag),
          flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
