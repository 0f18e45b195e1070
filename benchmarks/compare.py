"""rlhf_jax vs. the PyTorch stack: the same work, timed alternately in one run.

  python benchmarks/compare.py                          # all three, 5 timed repeats
  python benchmarks/compare.py --only sample --repeats 3
  python benchmarks/compare.py --only rm --only ppo --json runs/compare.json
  python benchmarks/compare.py --trl_python /tmp/trlvenv/bin/python   # TRL elsewhere
  python benchmarks/compare.py --d_model 512 --n_layers 8 --n_heads 8 # a larger shape
  make bench                     # pip install -e '.[bench]', then this script

Three figures. Each is timed A, B, A, B, ... (rlhf_jax, then PyTorch), so a
change in the machine's load hits both sides alike, after --warmup untimed rounds
that hold both sides' compilation and first-call set-up. Three by default: under
the trainer's malloc settings (rlhf_jax/host_memory.py) the process heap grows to
its peak over the first calls, and each call that grows it page-faults the new
memory in (up to four calls of the RM step; the figures are in BENCHMARKS.md):

  rm      one reward-model train step: 16 pairs x (128 prompt + 128 response)
          tokens, pairwise loss, AdamW with clipping (benchmarks/train_step.py),
          the jitted rlhf_jax step vs. a lean PyTorch eager step. rlhf_jax
          encodes each prompt once for both responses: the same loss and
          gradients from fewer FLOPs, which is part of what is measured.
  sample  batch 32, prompt 64, 64 new tokens, temperature 0.7, no early stop
          (benchmarks/sampler.py): the KV-cache sampler vs. transformers' generate.
  ppo     one PPO iteration (rollout, scoring, 4 epochs of updates on one
          minibatch), batch 32, prompt 64, 64 new tokens (benchmarks/ppo.py) vs.
          TRL 1.12's PPOTrainer, run in a persistent worker process (--trl_python)
          that does one iteration per request. Without trl the PPO figure is
          rlhf_jax's alone.

Run it on an otherwise idle machine. PyTorch's OpenMP threads spin at every
barrier: when another process takes one of the cores, a PyTorch thread left
waiting burns its time slice, and small-op work such as `generate` was seen
to slow down more than tenfold with 2 threads on 2 busy cores (1 thread was
unaffected). Spinning counts as CPU time, so the CPU-time ratio does not
correct for it; --torch_threads sets the thread count, and the JSON records it.

Model: GPT-2 shape, 4 layers, d_model 256, 4 heads, d_ff = 4 x d_model, vocab
8000, float32 (the project's CPU default). Ratios are rlhf_jax speed / PyTorch
speed = PyTorch's median seconds / rlhf_jax's, from wall time and, as a check on
a shared machine, from process CPU time. Issue 8's goals on a 2-core CPU: rm
>= 1.6x, sample >= 3x, ppo >= 2x.
"""
from __future__ import annotations

from rlhf_jax import host_memory

# As the trainer does, before jax starts its threads (rlhf_jax/host_memory.py).
host_memory.configure_for_this_host()

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from typing import Callable

import numpy as np

import ppo as ppo_bench
import sampler as sampler_bench
import train_step as rm_bench

BENCHMARKS = ("rm", "sample", "ppo")
GOALS = {"rm": 1.6, "sample": 3.0, "ppo": 2.0}  # on a 2-core CPU (issue 8)
PPO_PHASES = ("rollout", "score", "update")


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--only", action="append", choices=BENCHMARKS,
                      help="run only this benchmark (repeatable); default: all")
  parser.add_argument("--repeats", type=int, default=5, help="timed rounds (A, B)")
  parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
  parser.add_argument("--trl_python", default=ppo_bench.default_trl_python(),
                      help="python of a venv with trl==1.12.0; default: this one if "
                      "it has trl, else none (PPO measured for rlhf_jax alone)")
  parser.add_argument("--torch_threads", type=int, default=0,
                      help="PyTorch intra-op threads, here and in the TRL worker "
                      "(0: PyTorch's default, one per core)")
  parser.add_argument("--trl_keep_freed_memory", type=int, default=0,
                      help="1: TRL's worker gets rlhf_jax's CPU malloc settings too "
                      "(benchmarks/ppo.py); 0: TRL as it ships")
  parser.add_argument("--json", default="", help="write the results to this file")
  shape = parser.add_argument_group("model (GPT-2 shape, d_ff = 4 x d_model)")
  shape.add_argument("--n_layers", type=int, default=4)
  shape.add_argument("--d_model", type=int, default=256)
  shape.add_argument("--n_heads", type=int, default=4)
  shape.add_argument("--vocab", type=int, default=8000)
  shape.add_argument("--dtype", default="float32", help="rlhf_jax compute dtype")
  work = parser.add_argument_group("work")
  work.add_argument("--rm_pairs", type=int, default=16)
  work.add_argument("--rm_prompt_len", type=int, default=128)
  work.add_argument("--rm_response_len", type=int, default=128)
  work.add_argument("--batch", type=int, default=32, help="sampling and PPO prompts")
  work.add_argument("--prompt_len", type=int, default=64)
  work.add_argument("--new_tokens", type=int, default=64)
  work.add_argument("--epochs", type=int, default=4, help="PPO epochs")
  work.add_argument("--minibatches", type=int, default=1, help="PPO minibatches")
  return parser.parse_args(argv)


# --------------------------------------------------------------------------------
# Runners: each call does the work once and returns {'wall', 'cpu', ...} seconds
# --------------------------------------------------------------------------------


def timed(fn: Callable[[], object]) -> Callable[[], dict]:
  def run():
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}
  return run


def rm_runners(args) -> tuple[dict, dict]:
  """The reward-model steps of benchmarks/train_step.py, and the work per step."""
  step_args = rm_bench.parse_args([
      f"--n_layers={args.n_layers}", f"--d_model={args.d_model}",
      f"--n_heads={args.n_heads}", f"--vocab={args.vocab}", f"--pairs={args.rm_pairs}",
      f"--prompt_len={args.rm_prompt_len}", f"--response_len={args.rm_response_len}",
      f"--dtype={args.dtype}"])
  batch = rm_bench.make_batch(step_args, np.random.default_rng(0))
  jax_step, compile_s = rm_bench.build_jax(step_args, rm_bench.model_config_of(step_args),
                                           batch)
  print(f"  (rlhf_jax RM step compiled in {compile_s:.1f} s)", file=sys.stderr)
  runners = {"rlhf_jax": timed(jax_step),
             "pytorch": timed(rm_bench.build_torch(step_args, batch))}
  tokens = 2 * args.rm_pairs * (args.rm_prompt_len + args.rm_response_len)
  return runners, {"unit": "tokens", "per_call": tokens,
                   "what": f"RM train step, {args.rm_pairs} pairs x "
                           f"({args.rm_prompt_len} + {args.rm_response_len}) tokens"}


def sample_runners(args) -> tuple[dict, dict]:
  """benchmarks/sampler.py's rlhf_jax sampler and HF generate."""
  sample_args = sampler_bench.parse_args([
      f"--batch={args.batch}", f"--prompt={args.prompt_len}",
      f"--new_tokens={args.new_tokens}", f"--layers={args.n_layers}",
      f"--d_model={args.d_model}", f"--heads={args.n_heads}", f"--vocab={args.vocab}",
      f"--dtype={args.dtype}"])
  seeds = iter(range(1, 1 << 30))  # a fresh draw each call, as in sampler.py

  def seeded(run):
    return timed(lambda: run(next(seeds)))

  runners = {"rlhf_jax": seeded(sampler_bench.build_jax(sample_args)),
             "hf_generate": seeded(sampler_bench.build_hf(sample_args))}
  return runners, {"unit": "new tokens", "per_call": args.batch * args.new_tokens,
                   "what": f"sampling, batch {args.batch}, prompt {args.prompt_len}, "
                           f"{args.new_tokens} new tokens, temperature 0.7"}


def ppo_args(args):
  return ppo_bench.parse_args([
      "--impl=both", f"--trl_python={args.trl_python}", f"--batch={args.batch}",
      f"--prompt_len={args.prompt_len}", f"--new_tokens={args.new_tokens}",
      f"--epochs={args.epochs}", f"--minibatches={args.minibatches}",
      f"--warmup={args.warmup}", f"--iterations={args.repeats}", f"--dtype={args.dtype}",
      f"--vocab={args.vocab}", f"--d_model={args.d_model}", f"--n_layers={args.n_layers}",
      f"--n_heads={args.n_heads}", f"--d_ff={4 * args.d_model}",
      f"--torch_threads={args.torch_threads}",
      f"--trl_keep_freed_memory={args.trl_keep_freed_memory}"])


def iteration_result(times: dict[str, float]) -> dict:
  """ppo.phase_times -> wall / cpu of the whole iteration, plus the phases."""
  return {"wall": sum(times[p] for p in PPO_PHASES),
          "cpu": sum(times[p + "_cpu"] for p in PPO_PHASES), **times}


def ppo_runners(args, workers: list) -> tuple[dict, dict]:
  """rlhf_jax's PPO iteration (benchmarks/ppo.py) here, TRL's in a worker process
  (appended to `workers`, for the caller to close)."""
  worker = None
  if args.trl_python:
    # Started before the rlhf_jax build, which its set-up then overlaps; nothing
    # is being timed yet.
    worker = ppo_bench.TrlWorker(args.trl_python, ppo_args(args), args.warmup + args.repeats)
    workers.append(worker)
  else:
    print("(trl is not installed here and no --trl_python: PPO runs rlhf_jax alone)",
          file=sys.stderr)
  jax_iteration, _ = ppo_bench.build_jax(ppo_args(args))
  calls = iter(range(1 << 30))
  runners = {"rlhf_jax": lambda: iteration_result(jax_iteration(next(calls)))}
  if worker is not None:
    worker.wait_ready()
    runners["trl"] = lambda: iteration_result(worker.step())
  tokens = args.batch * (args.prompt_len + args.new_tokens)
  return runners, {"unit": "sequence tokens", "per_call": tokens,
                   "what": f"PPO iteration, batch {args.batch}, prompt {args.prompt_len}, "
                           f"{args.new_tokens} new tokens, {args.epochs} epochs x "
                           f"{args.minibatches} minibatch(es)"}


# --------------------------------------------------------------------------------
# Alternation and summaries
# --------------------------------------------------------------------------------


def alternate(name: str, runners: dict[str, Callable[[], dict]], warmup: int,
              repeats: int) -> dict[str, list[dict]]:
  """warmup + repeats rounds, each calling every runner once in order; the timed
  rounds' results per runner."""
  results = {impl: [] for impl in runners}
  for round_ in range(warmup + repeats):
    timed_round = round_ >= warmup
    line = []
    for impl, run in runners.items():
      result = run()
      line.append(f"{impl} {result['wall']:.3f} s")
      if timed_round:
        results[impl].append(result)
    label = f"{round_ - warmup + 1}/{repeats}" if timed_round else "warm-up"
    print(f"  {name} {label}: " + ", ".join(line), file=sys.stderr)
  return results


def summarize(name: str, results: dict[str, list[dict]], work: dict) -> dict:
  """Medians per implementation and the rlhf_jax / PyTorch speed ratios."""
  impls = {}
  for impl, calls in results.items():
    medians = {k: statistics.median(c[k] for c in calls) for k in calls[0]}
    impls[impl] = {"median_s": medians["wall"], "median_cpu_s": medians["cpu"],
                   "per_s": work["per_call"] / medians["wall"],
                   "wall_s": [c["wall"] for c in calls]}
    if name == "ppo":
      impls[impl]["phases_median_s"] = {p: medians[p] for p in PPO_PHASES}
  out = {**work, "impls": impls, "goal_cpu_2core": GOALS[name]}
  names = list(impls)
  if len(names) == 2:
    ours, theirs = impls[names[0]], impls[names[1]]
    out["ratio"] = theirs["median_s"] / ours["median_s"]
    out["ratio_cpu"] = theirs["median_cpu_s"] / ours["median_cpu_s"]
    if name == "ppo":
      out["phase_ratios"] = {p: theirs["phases_median_s"][p] / ours["phases_median_s"][p]
                             for p in PPO_PHASES}
  return out


def print_summary(name: str, summary: dict) -> None:
  print(f"{name}: {summary['what']}")
  for impl, r in summary["impls"].items():
    phases = ""
    if "phases_median_s" in r:
      phases = "  (" + ", ".join(f"{p} {s:.3f} s" for p, s in r["phases_median_s"].items()) + ")"
    print(f"  {impl:<12s} median {r['median_s']:9.4f} s  CPU {r['median_cpu_s']:9.4f} s  "
          f"{r['per_s']:12,.0f} {summary['unit']}/s{phases}")
  if "ratio" in summary:
    phases = ""
    if "phase_ratios" in summary:
      phases = "; " + ", ".join(f"{p} {x:.2f}x" for p, x in summary["phase_ratios"].items())
    print(f"  rlhf_jax / pytorch speed: {summary['ratio']:.2f}x wall, "
          f"{summary['ratio_cpu']:.2f}x CPU time{phases}  "
          f"(goal on a 2-core CPU: >= {summary['goal_cpu_2core']}x)")


# --------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------


def hardware() -> dict:
  """The CPU as lscpu describes it, the cores this process may use, the platform."""
  info = {}
  if shutil.which("lscpu"):
    text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    info = {k.strip(): v.strip() for k, _, v in
            (line.partition(":") for line in text.splitlines())
            if v and not k.startswith("Vulnerability")}
  flags = set(info.pop("Flags", "").split())
  cpu = info.get("Model name") or platform.processor() or platform.machine()
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  import jax
  devices = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
  return {"summary": f"{cpu}, {cores} usable CPUs; jax devices {devices}",
          "usable_cpus": cores, "platform": platform.platform(), "jax_devices": devices,
          # What the matmul kernels can use: the main difference between CPUs
          # that lscpu names alike.
          "simd": sorted(flags & {"avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16"}),
          "lscpu": info}


def torch_threads(threads: int):
  """Sets PyTorch's intra-op threads in this process (after the builders, since
  train_step.py's sets its own) and returns the count, None without torch."""
  if "torch" not in sys.modules:
    return None
  torch = sys.modules["torch"]
  if threads:
    torch.set_num_threads(threads)
  return torch.get_num_threads()


def versions() -> dict:
  out = {"python": platform.python_version()}
  for package in ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "transformers", "trl"):
    try:
      out[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      pass
  return out


def main(argv=None) -> None:
  args = parse_args(argv)
  selected = [b for b in BENCHMARKS if not args.only or b in args.only]
  env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
         "command": shlex.join([os.path.basename(sys.executable)] + sys.argv),
         "hardware": hardware(), "versions": versions()}
  print(f"{env['hardware']['summary']}\n{env['date']}  "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items()))
  workers = []
  build = {"rm": rm_runners, "sample": sample_runners,
           "ppo": lambda a: ppo_runners(a, workers)}
  results = {}
  try:
    for name in selected:
      runners, work = build[name](args)
      env["torch_threads"] = torch_threads(args.torch_threads)
      results[name] = summarize(name, alternate(name, runners, args.warmup, args.repeats),
                                work)
      print_summary(name, results[name])
  finally:
    for worker in workers:
      worker.close()
  for worker in workers:
    env["versions_trl_worker"] = worker.versions
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
      json.dump({**env, "args": vars(args), "results": results}, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
  main()
