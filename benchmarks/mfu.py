"""Tokens/s and MFU of every RLHF phase, at GPT-2 / llama sizes from 125M to ~1B.

  python benchmarks/mfu.py --sizes tiny                       # CPU, a few seconds
  python benchmarks/mfu.py --sizes 125m,350m,1b               # an accelerator
  python benchmarks/mfu.py --sizes 1b --rollout_batch 128 --json runs/mfu_1b.json
  python benchmarks/mfu.py --sizes 125m --peak_tflops 989 --peak_gbps 3350   # by hand

Phases, each the project's own jitted step (built as the trainers build them):
  sft      one SFT train step (steps/sft.py): cross-entropy on the response
  rm       one reward-model step (steps/reward.py): pairwise loss, prompt shared
  rollout  the KV-cache sampler (sampling.make_sampler): prefill + decode
  decode   the decode steps alone: (rollout time - prefill-only time) / (new - 1)
  score    PPO scoring (steps/rollout.py): reference, value and reward forwards
           over prompt + response (the policy's log-probs are the sampler's),
           rewards and GAE
  update   the PPO update (steps/ppo.py): epochs x minibatches of policy + value
           forward/backward and two optimizer steps

MFU = model FLOPs / time / peak FLOP/s (DESIGN.md section 8): 6 N FLOPs per trained
token, 2 N per forward token, N = TransformerConfig.param_count(). Attention's
own FLOPs are not counted (the usual 6N convention). One correction: where a pass
computes no logits for a position (the reward and value heads; the policy's
prompt positions, skipped with `logits_slice`), the LM head's vocab x d_model
matmul is taken out of N for that position; counting FLOPs that never ran would
inflate the MFU (by up to a third at GPT-2 small, whose vocabulary is a third of N).

Decode is bound by memory, not FLOPs: its figure is the fraction of the
bandwidth roofline, (bytes a decode step must read) / (step time) / peak GB/s. The
bytes are the weights at the compute dtype plus the filled part of the KV cache
(prompt + half the new tokens on average): the least any implementation reads.
One that re-reads float32 master weights, or attends over empty cache slots,
reads more and pays for it in step time.

Defaults: bfloat16 compute, float32 params (--dtype, --param_dtype). The peak is
looked up from the device kind (table below) unless --peak_tflops / --peak_gbps
are given; on a CPU the FLOP peak is an estimate (cores x clock x FMA width) and
the bandwidth unknown, so no roofline fraction is printed without --peak_gbps.
Timings are medians of --repeats calls after --warmup (which compiles).
"""
from __future__ import annotations

from rlhf_jax import host_memory

# As the trainer does, before jax starts its threads (rlhf_jax/host_memory.py).
host_memory.configure_for_this_host()

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rlhf_jax import optim, sampling, sharding
from rlhf_jax.models import heads
from rlhf_jax.models.transformer import TransformerConfig
from rlhf_jax.steps import ppo as ppo_lib
from rlhf_jax.steps import reward as reward_lib
from rlhf_jax.steps import rollout as rollout_lib
from rlhf_jax.steps import sft as sft_lib
from rlhf_jax.trainers import common

# Per chip: (dense bf16 TFLOP/s, memory GB/s), matched by prefix of device_kind,
# longest prefix first. Vendor datasheets:
#   NVIDIA H100 Tensor Core GPU datasheet: SXM 989 TFLOP/s bf16 dense (1,979 with
#     sparsity), 3.35 TB/s; PCIe 756 / 2.0 TB/s; NVL 835 / 3.9 TB/s.
#   NVIDIA H200 Tensor Core GPU datasheet: 989 TFLOP/s bf16 dense, 4.8 TB/s.
#   NVIDIA A100 datasheet: 312 TFLOP/s bf16 dense; 80GB SXM 2,039 GB/s, 40GB 1,555 GB/s.
#   Google Cloud TPU docs, system architecture (cloud.google.com/tpu/docs/v4, v5e,
#     v5p, v6e): v4 275 / 1,200; v5e 197 / 819; v5p 459 / 2,765; v6e 918 / 1,640.
DEVICE_PEAKS = {
    "NVIDIA H100 PCIe": (756.0, 2000.0),
    "NVIDIA H100 NVL": (835.0, 3900.0),
    "NVIDIA H100": (989.0, 3350.0),  # SXM5 80GB ("NVIDIA H100 80GB HBM3")
    "NVIDIA H200": (989.0, 4800.0),
    "NVIDIA A100-SXM4-80GB": (312.0, 2039.0),
    "NVIDIA A100": (312.0, 1555.0),
    "TPU v4": (275.0, 1200.0),
    "TPU v5 lite": (197.0, 819.0),  # v5e
    "TPU v5p": (459.0, 2765.0),
    "TPU v5": (459.0, 2765.0),  # v5p reports "TPU v5"
    "TPU v6 lite": (918.0, 1640.0),  # v6e (Trillium)
}

PHASES = ("sft", "rm", "rollout", "decode", "score", "update")


@dataclasses.dataclass(frozen=True)
class Preset:
  """A model shape and the batch shapes that fit it on one 80 GB accelerator."""
  model: dict
  batch: int          # SFT sequences per step; the RM step takes batch / 2 pairs
  rollout_batch: int  # PPO prompts per iteration (decode, scoring, update)
  prompt_len: int
  response_len: int
  minibatches: int    # PPO minibatches per epoch (activations of batch / this)
  epochs: int = 4


_GPT2 = dict(family="gpt2", vocab_size=50304, max_len=1024)  # 50,257 padded to 128s
PRESETS = {
    # Seconds on a CPU: every phase compiled and run once or twice.
    "tiny": Preset(dict(family="gpt2", vocab_size=512, d_model=64, n_layers=2, n_heads=2,
                        d_ff=256, max_len=64), batch=4, rollout_batch=4, prompt_len=16,
                   response_len=16, minibatches=1, epochs=1),
    # GPT-2 small / medium (Radford et al. 2019).
    "125m": Preset(dict(_GPT2, d_model=768, n_layers=12, n_heads=12, d_ff=3072),
                   batch=32, rollout_batch=64, prompt_len=256, response_len=256,
                   minibatches=1),
    "350m": Preset(dict(_GPT2, d_model=1024, n_layers=24, n_heads=16, d_ff=4096),
                   batch=32, rollout_batch=64, prompt_len=256, response_len=256,
                   minibatches=2),
    # Llama-shaped 1.1B (TinyLlama's shape: 22 layers, GQA with 4 kv heads).
    "1b": Preset(dict(family="llama", vocab_size=32000, d_model=2048, n_layers=22,
                      n_heads=32, n_kv_heads=4, d_ff=5632, max_len=2048),
                 batch=16, rollout_batch=64, prompt_len=256, response_len=256,
                 minibatches=8),
}


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default="125m,350m,1b",
                      help=f"comma-separated presets: {', '.join(PRESETS)}")
  parser.add_argument("--phases", default=",".join(PHASES),
                      help="comma-separated subset of " + ", ".join(PHASES))
  parser.add_argument("--dtype", default="bfloat16", help="compute dtype")
  parser.add_argument("--param_dtype", default="float32")
  parser.add_argument("--remat", default="none", choices=("none", "full", "dots"))
  parser.add_argument("--scan_layers", action="store_true",
                      help="nn.scan over layers: faster compiles of deep models")
  for name in ("batch", "rollout_batch", "prompt_len", "response_len", "minibatches",
               "epochs"):
    parser.add_argument(f"--{name}", type=int, default=0, help="override the preset's")
  parser.add_argument("--fsdp", type=int, default=1, help="mesh fsdp axis (data = rest)")
  parser.add_argument("--tensor", type=int, default=1, help="mesh tensor axis")
  parser.add_argument("--warmup", type=int, default=1, help="untimed calls (compile)")
  parser.add_argument("--repeats", type=int, default=3, help="timed calls; the median")
  parser.add_argument("--peak_tflops", type=float, default=0.0,
                      help="peak TFLOP/s per device (0: from the device table)")
  parser.add_argument("--peak_gbps", type=float, default=0.0,
                      help="peak memory GB/s per device (0: from the device table)")
  parser.add_argument("--json", default="", help="write the results here")
  return parser.parse_args(argv)


# --------------------------------------------------------------------------------
# Device peaks
# --------------------------------------------------------------------------------


def cpu_peak_flops() -> tuple[float, str]:
  """cores x MHz x FLOPs/cycle from /proc/cpuinfo (float32, FMA counted as 2)."""
  try:
    info = open("/proc/cpuinfo").read()
  except OSError:
    return float("nan"), "unknown CPU"
  mhz = [float(line.split(":")[1]) for line in info.splitlines() if line.startswith("cpu MHz")]
  cores = os.cpu_count() or 1
  per_cycle = 64 if "avx512f" in info else 32 if ("avx2" in info and "fma" in info) else 8
  ghz = (max(mhz) if mhz else 2000.0) / 1000
  return cores * ghz * 1e9 * per_cycle, (f"{cores} cores x {ghz:.2f} GHz x {per_cycle} "
                                          f"FLOP/cycle")


def device_peaks(tflops: float = 0.0, gbps: float = 0.0) -> tuple[float, float, str]:
  """(peak FLOP/s, peak bytes/s, description) of all local devices together.

  Explicit per-device figures win; otherwise the table, matched on device_kind.
  Unknown figures are nan (their MFU / roofline columns then read nan).
  """
  device, n = jax.devices()[0], jax.device_count()
  flops, bandwidth, text = float("nan"), float("nan"), device.device_kind
  if device.platform == "cpu":
    flops, text = cpu_peak_flops()
    n = 1  # forced host "devices" share the same cores
  else:
    for name in sorted(DEVICE_PEAKS, key=len, reverse=True):
      if device.device_kind.startswith(name):
        flops, bandwidth = (x * scale for x, scale in zip(DEVICE_PEAKS[name], (1e12, 1e9)))
        text = f"{n} x {device.device_kind} ({name}: bf16 dense, HBM)"
        break
  if tflops:
    flops, text = tflops * 1e12, f"{n} x {tflops:g} TFLOP/s (given)"
  if gbps:
    bandwidth = gbps * 1e9
    text += f", {gbps:g} GB/s (given)"
  return flops * n, bandwidth * n, text


def device_peak() -> tuple[float, str]:
  """(peak FLOP/s, description): what benchmarks/train_step.py reports MFU against."""
  flops, _, text = device_peaks()
  return flops, text


# --------------------------------------------------------------------------------
# FLOPs and bytes
# --------------------------------------------------------------------------------


def pass_flops(cfg: TransformerConfig, tokens: int, logit_tokens: int, per_param: int) -> float:
  """`per_param` (2 forward, 6 trained) x N x tokens, less the LM head where no
  logits were computed (tokens - logit_tokens positions)."""
  head = cfg.vocab_size * cfg.d_model
  return per_param * (cfg.param_count() * tokens - head * (tokens - logit_tokens))


def decode_bytes(cfg: TransformerConfig, batch: int, prompt_len: int, new_tokens: int) -> float:
  """Bytes one decode step must read: weights + the filled KV cache, compute dtype.

  Weights: every matrix, the LM head included (the tied embedding is read whole
  by the LM head); not the position table or an untied input embedding, of which
  a step reads one row per sequence.
  """
  itemsize = jnp.dtype(cfg.dtype).itemsize
  weights = cfg.param_count()
  if cfg.positions == "learned":
    weights -= cfg.max_len * cfg.d_model
  if not cfg.tied_embeddings:
    weights -= cfg.vocab_size * cfg.d_model
  filled = prompt_len + new_tokens / 2  # slots holding keys, averaged over the steps
  kv = 2 * cfg.n_layers * batch * filled * cfg.n_kv_heads * cfg.head_dim
  return (weights + kv) * itemsize


# --------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------


def median_seconds(run: Callable[[], object], warmup: int, repeats: int) -> float:
  """Median wall seconds of `run()` (which blocks), after `warmup` untimed calls."""
  for _ in range(max(warmup, 1)):  # at least one: the first call compiles
    run()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


@dataclasses.dataclass
class Setup:
  """One size's model config, shapes, mesh and shardings, shared by the phases."""
  name: str
  cfg: TransformerConfig
  batch: int
  rollout_batch: int
  prompt_len: int
  response_len: int
  minibatches: int
  epochs: int
  mesh: jax.sharding.Mesh
  args: argparse.Namespace

  @property
  def replicated(self):
    return sharding.replicated(self.mesh)

  def batch_sharding(self):
    return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(("data", "fsdp")))


def make_setup(name: str, args) -> Setup:
  preset = PRESETS[name]
  shapes = {k: getattr(args, k) or getattr(preset, k)
            for k in ("batch", "rollout_batch", "prompt_len", "response_len", "minibatches",
                      "epochs")}
  model = dict(preset.model, dtype=args.dtype, param_dtype=args.param_dtype, remat=args.remat,
               scan_layers=args.scan_layers)
  model["max_len"] = max(model["max_len"], shapes["prompt_len"] + shapes["response_len"])
  mesh = sharding.make_mesh(ml_collections.ConfigDict(
      dict(data=-1, fsdp=args.fsdp, tensor=args.tensor)))
  return Setup(name, TransformerConfig.from_config(model), mesh=mesh, args=args, **shapes)


def optimizer():
  """AdamW, clipped, constant learning rate: the trainers' optimizer (optim.py)."""
  return optim.make_optimizer(ml_collections.ConfigDict(dict(
      learning_rate=1e-5, schedule="constant", warmup_steps=0, end_lr_fraction=0.0,
      b1=0.9, b2=0.999, eps=1e-5, weight_decay=0.01, grad_clip_norm=1.0)), 1000)


def random_tokens(rng: np.random.Generator, vocab: int, shape) -> np.ndarray:
  return rng.integers(4, vocab, shape).astype(np.int32)


def result(phase: str, seconds: float, tokens: int, flops: float, peak_flops: float,
           **extra) -> dict:
  return {"phase": phase, "step_s": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
          "tflops_per_s": flops / seconds / 1e12, "mfu": flops / seconds / peak_flops, **extra}


# --------------------------------------------------------------------------------
# Phases
# --------------------------------------------------------------------------------


def time_train_step(s: Setup, model, make_step, batch: dict) -> float:
  """Median seconds of a jitted, donated train step (as trainers/supervised.py jits it)."""
  tx, schedule = optimizer()
  state_sharding = common.state_sharding(model, tx, s.mesh)
  with jax.set_mesh(s.mesh):
    state = common.init_train_state(model, tx, jax.random.key(0), state_sharding)
    step = jax.jit(make_step(model, tx, schedule),
                   in_shardings=(state_sharding, sharding.batch_shardings(batch, s.mesh),
                                 s.replicated),
                   out_shardings=(state_sharding, s.replicated), donate_argnums=(0,))
    device_batch = sharding.shard_batch(batch, s.mesh)
    holder = {"state": state}
    rng = jax.random.key(1)

    def run():
      holder["state"], metrics = step(holder["state"], device_batch, rng)
      jax.block_until_ready(metrics)
    return median_seconds(run, s.args.warmup, s.args.repeats)


def bench_sft(s: Setup, peak_flops: float, rng) -> dict:
  b, p, r = s.batch, s.prompt_len, s.response_len
  batch = {"prompt_tokens": random_tokens(rng, s.cfg.vocab_size, (b, p)),
           "prompt_mask": np.ones((b, p), np.int32),
           "response_tokens": random_tokens(rng, s.cfg.vocab_size, (b, r)),
           "response_mask": np.ones((b, r), np.int32), "weight": np.ones(b, np.float32)}
  seconds = time_train_step(s, heads.PolicyModel(s.cfg), sft_lib.make_sft_step, batch)
  tokens = b * (p + r)
  return result("sft", seconds, tokens, pass_flops(s.cfg, tokens, b * r, 6), peak_flops)


def bench_rm(s: Setup, peak_flops: float, rng) -> dict:
  """Pairs of responses; the step encodes each prompt once for both (reward.py),
  so tokens = pairs x (prompt + 2 responses), all without logits."""
  b, p, r = max(s.batch // 2, 1), s.prompt_len, s.response_len
  batch = {"prompt_tokens": random_tokens(rng, s.cfg.vocab_size, (b, p)),
           "prompt_mask": np.ones((b, p), np.int32),
           "response_tokens": random_tokens(rng, s.cfg.vocab_size, (b, 2, r)),
           "response_mask": np.ones((b, 2, r), np.int32),
           "ranks": np.tile(np.array([[0, 1]], np.int32), (b, 1)),
           "response_valid": np.ones((b, 2), np.int32), "weight": np.ones(b, np.float32)}
  seconds = time_train_step(s, heads.RewardModel(s.cfg), reward_lib.make_rm_step, batch)
  tokens = b * (p + 2 * r)
  return result("rm", seconds, tokens, pass_flops(s.cfg, tokens, 0, 6), peak_flops)


def init_params(model, seed: int, mesh):
  """Params born in their shardings (sharding.init_sharded), and the shardings."""
  return sharding.init_sharded(
      lambda k: model.init(k, jnp.ones((1, 8), jnp.int32))["params"], jax.random.key(seed),
      mesh)


def bench_rollout(s: Setup, peak_flops: float, peak_bandwidth: float, policy_params,
                  prompts, prompt_mask) -> list[dict]:
  """The sampler with all new tokens, and with one (prefill only): their difference
  over the new - 1 decode steps is the decode step time."""
  b, p, r = s.rollout_batch, s.prompt_len, s.response_len
  policy = heads.PolicyModel(s.cfg)

  def sampler_seconds(new_tokens: int) -> float:
    sampler = sampling.make_sampler(policy, sampling.SamplingParams(
        new_tokens=new_tokens, stop_token=-1, temperature=0.7))  # -1: never stops early
    key = jax.random.key(2)
    return median_seconds(
        lambda: jax.block_until_ready(sampler(policy_params, prompts, prompt_mask, key)),
        s.args.warmup, s.args.repeats)

  total = sampler_seconds(r)
  # Prefill: logits at the last prompt position only; decode: one token per step.
  flops = pass_flops(s.cfg, b * p, b, 2) + 2 * s.cfg.param_count() * b * (r - 1)
  rows = [result("rollout", total, b * r, flops, peak_flops)]
  if "decode" in s.args.phases and r > 1:
    prefill = sampler_seconds(1)
    # A model so small that decoding is lost in timing noise can come out with
    # total <= prefill: no figure (nan) rather than an absurd one.
    step = (total - prefill) / (r - 1) if total > prefill else float("nan")
    bytes_per_step = decode_bytes(s.cfg, b, p, r)
    rows.append(result("decode", step, b, 2 * s.cfg.param_count() * b, peak_flops,
                       bytes_per_step=bytes_per_step, gb_per_s=bytes_per_step / step / 1e9,
                       roofline=bytes_per_step / step / peak_bandwidth))
  return rows


def fake_samples(rng, vocab: int, batch: int, length: int, batch_sh) -> sampling.Samples:
  """Random responses without the stop token (every row all `length` tokens long);
  the per-token float fields (log-probs, entropies) zero: scoring takes them as
  they are, so only the time of the scoring forwards is measured."""
  fields = {name: np.zeros((batch, length), np.float32) for name in sampling.Samples._fields}
  fields.update(tokens=random_tokens(rng, vocab, (batch, length)),
                mask=np.ones((batch, length), np.int32))
  return sampling.Samples(**{k: jax.device_put(v, batch_sh) for k, v in fields.items()})


def bench_ppo(s: Setup, peak_flops: float, peak_bandwidth: float, rng) -> list[dict]:
  """rollout/decode, score and update on one set of four networks, as
  trainers/ppo.py builds them; each tree is dropped once no phase needs it."""
  cfg, b, p, r = s.cfg, s.rollout_batch, s.prompt_len, s.response_len
  phases = s.args.phases
  models = rollout_lib.Models(heads.PolicyModel(cfg), heads.ValueModel(cfg),
                              heads.RewardModel(cfg))
  batch_sh, replicated = s.batch_sharding(), s.replicated
  rows = []
  with jax.set_mesh(s.mesh):
    policy, policy_sh = init_params(models.policy, 0, s.mesh)
    prompts = jax.device_put(random_tokens(rng, cfg.vocab_size, (b, p)), batch_sh)
    prompt_mask = jax.device_put(np.ones((b, p), np.int32), batch_sh)
    if {"rollout", "decode"} & set(phases):
      rows += bench_rollout(s, peak_flops, peak_bandwidth, policy, prompts, prompt_mask)
    if not {"score", "update"} & set(phases):
      return rows
    value, value_sh = init_params(models.value, 1, s.mesh)
    reference = jax.tree.map(jnp.copy, policy)
    reward = jax.tree.map(jnp.copy, value)
    samples = fake_samples(rng, cfg.vocab_size, b, r, batch_sh)
    fns = rollout_lib.make_rollout_fns(
        models, sampling.SamplingParams(new_tokens=r, stop_token=3, temperature=0.7),
        rollout_lib.ScoringParams(stop_token=3, temperature=0.7),
        params_sharding={"policy": policy_sh, "reference": policy_sh, "value": value_sh,
                         "reward": value_sh},
        batch_sharding=batch_sh, replicated=replicated)
    params = {"policy": policy, "reference": reference, "value": value, "reward": reward}
    beta = np.float32(0.05)
    score = lambda: jax.block_until_ready(fns.score(params, prompts, prompt_mask, samples, beta))
    tokens = b * (p + r)
    if "score" in phases:
      seconds = median_seconds(score, s.args.warmup, s.args.repeats)
      # Reference: logits at the R response positions; value, reward: none.
      flops = pass_flops(cfg, tokens, b * r, 2) + 2 * pass_flops(cfg, tokens, 0, 2)
      rows.append(result("score", seconds, tokens, flops, peak_flops))
    if "update" not in phases:
      return rows
    rollout_batch, _ = score()
    del params, reference, reward, fns  # the update needs only the policy and value
    rows.append(bench_update(s, peak_flops, models, policy, value, policy_sh, value_sh,
                             rollout_batch))
  return rows


def bench_update(s: Setup, peak_flops: float, models, policy, value, policy_sh, value_sh,
                 rollout_batch) -> dict:
  cfg, b, p, r = s.cfg, s.rollout_batch, s.prompt_len, s.response_len
  tx, _ = optimizer()
  abstract_policy = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), policy)
  abstract_value = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), value)
  state_sh = ppo_lib.state_sharding(tx, tx, abstract_policy, abstract_value, policy_sh,
                                    value_sh, s.replicated, ema=False)
  # Donated: the state takes over the params' memory (two fewer 1B copies).
  state = jax.jit(lambda pp, vv: ppo_lib.init_state(pp, vv, tx, tx),
                  out_shardings=state_sh, donate_argnums=(0, 1))(policy, value)
  update = ppo_lib.make_update(
      models.policy, models.value, tx, tx,
      ppo_lib.UpdateParams(epochs=s.epochs, minibatches=s.minibatches, temperature=0.7),
      state_sharding=state_sh, batch_sharding=s.batch_sharding(), replicated=s.replicated)
  batch = {k: rollout_batch[k] for k in rollout_lib.UPDATE_KEYS}
  holder = {"state": state}
  key = jax.random.key(3)

  def run():
    holder["state"], metrics = update(holder["state"], batch, None, key)
    jax.block_until_ready(metrics)

  seconds = median_seconds(run, s.args.warmup, s.args.repeats)
  tokens = s.epochs * b * (p + r)
  # Policy: logits at the response positions; value: none. Both trained.
  flops = pass_flops(cfg, tokens, s.epochs * b * r, 6) + pass_flops(cfg, tokens, 0, 6)
  return result("update", seconds, tokens, flops, peak_flops)


def bench_size(name: str, args, peak_flops: float, peak_bandwidth: float) -> list[dict]:
  s = make_setup(name, args)
  rng = np.random.default_rng(0)
  rows = []
  if "sft" in args.phases:
    rows.append(bench_sft(s, peak_flops, rng))
  if "rm" in args.phases:
    rows.append(bench_rm(s, peak_flops, rng))
  if {"rollout", "decode", "score", "update"} & set(args.phases):
    rows += bench_ppo(s, peak_flops, peak_bandwidth, rng)
  shape = dict(params=s.cfg.param_count(), family=s.cfg.family, d_model=s.cfg.d_model,
               n_layers=s.cfg.n_layers, vocab=s.cfg.vocab_size, batch=s.batch,
               rollout_batch=s.rollout_batch, prompt_len=s.prompt_len,
               response_len=s.response_len, epochs=s.epochs, minibatches=s.minibatches,
               dtype=args.dtype, param_dtype=args.param_dtype, remat=args.remat,
               scan_layers=args.scan_layers)
  return [dict(size=name, **shape, **row) for row in rows]


# --------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------


def print_rows(rows: list[dict]) -> None:
  print(f"{'size':>5s} {'params':>8s} {'phase':>8s} {'ms/step':>10s} {'tokens/s':>12s} "
        f"{'TFLOP/s':>9s} {'MFU':>7s} {'GB/s':>8s} {'roofline':>9s}")
  for row in rows:
    bandwidth = (f"{row['gb_per_s']:8.1f} {row['roofline']:9.1%}" if "gb_per_s" in row
                 else f"{'':8s} {'':9s}")
    print(f"{row['size']:>5s} {row['params'] / 1e6:7.1f}M {row['phase']:>8s} "
          f"{row['step_s'] * 1e3:10.2f} {row['tokens_per_s']:12,.0f} "
          f"{row['tflops_per_s']:9.3f} {row['mfu']:7.1%} {bandwidth}")


def environment() -> dict:
  import flax
  import optax
  return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "command": shlex.join([os.path.basename(sys.executable)] + sys.argv),
          "platform": platform.platform(), "processor": platform.processor(),
          "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
          "versions": {"python": platform.python_version(), "jax": jax.__version__,
                       "flax": flax.__version__, "optax": optax.__version__,
                       "numpy": np.__version__}}


def main(argv=None) -> None:
  args = parse_args(argv)
  args.phases = [p for p in args.phases.split(",") if p]
  sizes = [s for s in args.sizes.split(",") if s]
  for name in sizes:
    if name not in PRESETS:
      sys.exit(f"--sizes: {name!r} is not one of {', '.join(PRESETS)}")
  for phase in args.phases:
    if phase not in PHASES:
      sys.exit(f"--phases: {phase!r} is not one of {', '.join(PHASES)}")
  peak_flops, peak_bandwidth, peak_text = device_peaks(args.peak_tflops, args.peak_gbps)
  env = environment()
  print(f"{env['devices']}; peak {peak_flops / 1e12:.3g} TFLOP/s, "
        f"{peak_bandwidth / 1e9:.4g} GB/s ({peak_text}); compute {args.dtype}, "
        f"params {args.param_dtype}")
  rows = []
  for name in sizes:
    size_rows = bench_size(name, args, peak_flops, peak_bandwidth)
    print_rows(size_rows)
    rows += size_rows
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
      json.dump({**env, "peak_flops": peak_flops, "peak_bytes_per_s": peak_bandwidth,
                 "peak": peak_text, "rows": rows}, f, indent=2, default=str)


if __name__ == "__main__":
  main()
