"""Reward-model train step throughput: rlhf_jax vs. a PyTorch eager step, same shape.

The shape of the reference measurement (DESIGN.md §8 / issue 4): a GPT-2-shaped
trunk (4 layers, d_model 256, 4 heads, d_ff 1024, vocab 8000, learned positions,
tied embeddings), 16 prompts x 2 responses, each sequence 128 prompt + 128 response
tokens (8,192 tokens per step), pairwise loss, AdamW with global-norm clipping.

  python benchmarks/train_step.py                 # both, on this machine's CPU
  python benchmarks/train_step.py --no-torch      # JAX only (e.g. on a TPU VM)
  python benchmarks/train_step.py --d_model 2048 --n_layers 16 --n_heads 16 \\
      --vocab 32000 --dtype bfloat16 --no-torch   # ~1B params, on an accelerator

Prints tokens/s, model FLOP/s and MFU. tokens/s counts sequence tokens (16 x 2 x
256 = 8,192 per step), like the reference (1,800 tokens/s = 57 GFLOP/s on a 2-core
machine). FLOPs follow DESIGN.md §8: 6 * N * tokens run through the model, with N
= the trunk + embedding parameters (`TransformerConfig.param_count`); the
rlhf_jax step runs each prompt once for both its responses (6,144 tokens per
step), the PyTorch step every sequence whole; attention FLOPs are not counted.
rlhf_jax's last layer also runs only its keys and values except at each
response's EOS (models/transformer.py, `read`), which this count does not
subtract: its FLOP/s and MFU are upper bounds; tokens/s is the figure to compare.
The peak is the device's: for a CPU, cores x clock x FLOPs/cycle (32 float32
FLOPs per cycle per core with AVX2 FMA, 64 with AVX-512), so a CPU MFU is an
estimate: /proc/cpuinfo gives a VM's nominal clock, not its turbo clock, and the
embedding counted in N is a lookup here, not a matmul (kept to match the
reference's count), so on some CPUs the PyTorch step reads above 100% (seen: a
2-core Xeon at a nominal 2.6 GHz).
"""
from __future__ import annotations

from rlhf_jax import host_memory

# As the trainer does, before jax starts its threads (rlhf_jax/host_memory.py).
host_memory.configure_for_this_host()

import argparse
import os
import statistics
import time

import jax
import numpy as np

from rlhf_jax import config_base, optim, sharding
from rlhf_jax.models import heads
from rlhf_jax.models.transformer import TransformerConfig
from rlhf_jax.steps import reward
from rlhf_jax.trainers import common

from mfu import device_peak  # the one table of device peaks


def make_batch(args, rng: np.random.Generator) -> dict:
  b, p, r = args.pairs, args.prompt_len, args.response_len
  return {"prompt_tokens": rng.integers(4, args.vocab, (b, p)).astype(np.int32),
          "prompt_mask": np.ones((b, p), np.int32),
          "response_tokens": rng.integers(4, args.vocab, (b, 2, r)).astype(np.int32),
          "response_mask": np.ones((b, 2, r), np.int32),
          "ranks": np.tile(np.array([[0, 1]], np.int32), (b, 1)),
          "response_valid": np.ones((b, 2), np.int32),
          "weight": np.ones(b, np.float32)}


def time_steps(run_step, steps: int) -> tuple[float, float]:
  """Median (wall, process CPU) seconds per step. On a shared machine the CPU time
  (all threads) shows the work done when wall time is inflated by other load."""
  walls, cpus = [], []
  for _ in range(steps):
    wall, cpu = time.perf_counter(), time.process_time()
    run_step()
    walls.append(time.perf_counter() - wall)
    cpus.append(time.process_time() - cpu)
  return statistics.median(walls), statistics.median(cpus)


def build_jax(args, model_config: TransformerConfig, batch: dict):
  """(run, compile seconds): `run()` does one jitted rlhf_jax RM step, blocking."""
  config = config_base.base_config()
  config.optim.weight_decay = 0.01
  mesh = sharding.make_mesh(config.mesh)
  model = heads.RewardModel(model_config)
  tx, schedule = optim.make_optimizer(config.optim, 1000)
  state_shardings = common.state_sharding(model, tx, mesh)
  replicated = sharding.replicated(mesh)
  with jax.set_mesh(mesh):
    state = common.init_train_state(model, tx, jax.random.key(0), state_shardings)
    batch_shardings = sharding.batch_shardings(batch, mesh)
    step = jax.jit(reward.make_rm_step(model, tx, schedule, accum_steps=args.accum_steps),
                   in_shardings=(state_shardings, batch_shardings, replicated),
                   out_shardings=(state_shardings, replicated), donate_argnums=(0,))
    device_batch = sharding.shard_batch(batch, mesh)
    rng = jax.random.key(1)
    start = time.perf_counter()
    compiled = step.lower(state, device_batch, rng).compile()
    compile_s = time.perf_counter() - start
  holder = {"state": state}

  def run():
    holder["state"], metrics = compiled(holder["state"], device_batch, rng)
    jax.block_until_ready(metrics["loss/rm"])
  return run, compile_s


def bench_jax(args, model_config: TransformerConfig, batch: dict):
  """((wall, cpu) seconds per step, compile seconds) of the jitted rlhf_jax RM step."""
  run, compile_s = build_jax(args, model_config, batch)
  time_steps(run, args.warmup)
  return time_steps(run, args.steps), compile_s


def build_torch(args, batch: dict):
  """`run()`: one step of the same model, loss and optimizer in PyTorch eager:
  fused qkv, flash-style causal SDPA, the reward at the last token."""
  import torch
  from torch import nn
  import torch.nn.functional as F

  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count() or 1)
  d, heads_, length = args.d_model, args.n_heads, args.prompt_len + args.response_len

  class Block(nn.Module):
    def __init__(self):
      super().__init__()
      self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
      self.qkv, self.o = nn.Linear(d, 3 * d), nn.Linear(d, d)
      self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
      b, t, _ = x.shape
      q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, heads_, d // heads_).unbind(2)
      att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), is_causal=True)
      x = x + self.o(att.transpose(1, 2).reshape(b, t, d))
      return x + self.down(F.gelu(self.up(self.ln2(x)), approximate="tanh"))

  class Reward(nn.Module):
    def __init__(self):
      super().__init__()
      self.embed, self.pos = nn.Embedding(args.vocab, d), nn.Embedding(max_len(args), d)
      self.blocks = nn.ModuleList(Block() for _ in range(args.n_layers))
      self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, 1)

    def forward(self, tokens):
      x = self.embed(tokens) + self.pos(torch.arange(tokens.shape[1]))
      for block in self.blocks:
        x = block(x)
      return self.head(self.ln(x))[:, -1, 0]  # the last token: every token is real

  model = Reward()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, eps=1e-5, weight_decay=0.01)
  prompts = torch.from_numpy(batch["prompt_tokens"]).long()
  responses = torch.from_numpy(batch["response_tokens"]).long()
  tokens = torch.cat([prompts[:, None].expand(-1, 2, -1), responses], -1).reshape(-1, length)

  def run():
    rewards = model(tokens).view(-1, 2)
    loss = -F.logsigmoid(rewards[:, 0] - rewards[:, 1]).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
  return run


def bench_torch(args, batch: dict) -> tuple[float, float]:
  """(wall, cpu) seconds per step of the PyTorch eager step."""
  run = build_torch(args, batch)
  time_steps(run, args.warmup)
  return time_steps(run, args.steps)


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--n_layers", type=int, default=4)
  parser.add_argument("--d_model", type=int, default=256)
  parser.add_argument("--n_heads", type=int, default=4)
  parser.add_argument("--vocab", type=int, default=8000)
  parser.add_argument("--pairs", type=int, default=16)
  parser.add_argument("--prompt_len", type=int, default=128)
  parser.add_argument("--response_len", type=int, default=128)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--accum_steps", type=int, default=1)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--no-torch", dest="torch", action="store_false")
  return parser.parse_args(argv)


def model_config_of(args) -> TransformerConfig:
  """The GPT-2-shaped reward trunk of `args` (d_ff = 4 d_model)."""
  return TransformerConfig.from_config(dict(
      family="gpt2", vocab_size=args.vocab, d_model=args.d_model, n_layers=args.n_layers,
      n_heads=args.n_heads, n_kv_heads=args.n_heads, d_ff=4 * args.d_model,
      max_len=max_len(args), dtype=args.dtype))


def max_len(args) -> int:
  """Rows of the learned position table: 512 (as before), or longer sequences."""
  return max(512, args.prompt_len + args.response_len)


def main() -> None:
  args = parse_args()

  model_config = model_config_of(args)
  batch = make_batch(args, np.random.default_rng(0))
  # Throughput counts sequence tokens (2 x pairs x (prompt + response)), as the
  # reference does; FLOPs count the tokens the model actually runs, since the
  # rlhf_jax step encodes each prompt once for both of its responses.
  tokens = 2 * args.pairs * (args.prompt_len + args.response_len)
  processed = args.pairs * (args.prompt_len + 2 * args.response_len)
  flops_per_step = 6 * model_config.param_count() * processed
  peak, peak_text = device_peak()
  print(f"RM step: {model_config.n_layers} layers, d_model {model_config.d_model}, "
        f"vocab {model_config.vocab_size}, {model_config.param_count() / 1e6:.2f}M params; "
        f"{args.pairs} pairs x {args.prompt_len + args.response_len} tokens = {tokens} "
        f"tokens/step; {jax.devices()[0].device_kind} ({peak_text})")

  def report(name: str, times: tuple[float, float], flops: float) -> float:
    seconds, cpu = times
    rate = tokens / seconds
    achieved = flops / seconds
    print(f"  {name:<14} {seconds * 1e3:8.1f} ms/step {rate:10,.0f} tokens/s "
          f"{achieved / 1e9:8.1f} GFLOP/s  MFU {achieved / peak:6.1%}  "
          f"(CPU time {cpu:.2f} s/step)")
    return rate

  jax_times, compile_seconds = bench_jax(args, model_config, batch)
  jax_rate = report("rlhf_jax", jax_times, flops_per_step)
  print(f"  (compile {compile_seconds:.1f} s)")
  if args.torch:
    torch_times = bench_torch(args, batch)
    # The PyTorch step runs every sequence whole: 6 N x all 2 x pairs sequences.
    torch_rate = report("pytorch eager", torch_times, 6 * model_config.param_count() * tokens)
    print(f"  rlhf_jax / pytorch: {jax_rate / torch_rate:.2f}x wall time, "
          f"{torch_times[1] / jax_times[1]:.2f}x CPU time; vs the 2-core reference "
          f"(1,800 tokens/s): {jax_rate / 1800:.2f}x")


if __name__ == "__main__":
  main()
