"""New tokens/s of the KV-cache sampler, side by side with Hugging Face `generate`.

  python benchmarks/sampler.py                 # rlhf_jax only
  python benchmarks/sampler.py --compare_hf    # also transformers' generate (torch CPU)
  python benchmarks/sampler.py --compare_hf --cpu_devices 2   # one XLA device per core

Shape (the issue's reference): GPT-2 family, 4 layers, d_model 256, 4 heads, vocab
8000; batch 32, prompt 64, 64 new tokens, temperature 0.7. No stop token, so every
row generates all 64 tokens in both stacks. Medians over --repeats runs, alternating.

--cpu_devices N splits the host CPU into N XLA devices and the batch over them (a
data = N mesh, parameters replicated), as `jax_num_cpu_devices` does for any jax
program. Decoding is a chain of small ops, many of which XLA's CPU backend runs on
one thread (the attention's batched dots, the reductions); with one device per
core the two halves of the batch run them side by side. On a 2-core CPU this
made sampling about 18% faster (while the RM train step of train_step.py, whose
large matmuls already use both cores, was about 10% slower on two devices).

On a purely data-parallel mesh each device also runs its own decode loop and stops
on its own (rlhf_jax/sampling.py), so no all-reduce crosses the devices per token.

Memory allocator: this script leaves glibc's malloc as it is, as a notebook or a
sampling-only job has it. The trainer instead calls
`host_memory.configure_for_this_host()`, one malloc arena that keeps freed memory,
which speeds its training steps up and slows sampling down (6-26% measured here;
rlhf_jax/host_memory.py). `RLHF_JAX_KEEP_FREED_MEMORY=1 python
benchmarks/sampler.py ...` measures both stacks under the trainer's setting;
benchmarks/ppo.py and compare.py time the PPO rollout under it.
"""
import os

from rlhf_jax import host_memory

# glibc's default malloc unless RLHF_JAX_KEEP_FREED_MEMORY asks for the trainer's
# setting (see the docstring); both stacks run under the same one. Before jax starts
# its threads, as in the trainer.
if host_memory.ENV_VAR in os.environ:
  host_memory.configure_for_this_host()

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rlhf_jax import sampling, sharding
from rlhf_jax.models import heads
from rlhf_jax.models.transformer import TransformerConfig


def build_jax(args):
  config = TransformerConfig.from_config(dict(
      family="gpt2", vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers,
      n_heads=args.heads, n_kv_heads=args.heads, d_ff=4 * args.d_model,
      max_len=args.prompt + args.new_tokens, dtype=args.dtype, scan_layers=args.scan_layers))
  model = heads.PolicyModel(config)
  # A data mesh over every device (one, unless --cpu_devices says more): the batch
  # is split over it, the parameters replicated.
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))
  batch_sharding = sharding.batch_sharding(mesh)
  with jax.set_mesh(mesh):
    params = jax.jit(lambda r: model.init(r, jnp.ones((1, 4), jnp.int32))["params"],
                     out_shardings=sharding.replicated(mesh))(jax.random.key(0))
    sampler = sampling.make_sampler(model, sampling.SamplingParams(
        new_tokens=args.new_tokens, stop_token=-1, temperature=0.7))
    prompts = jax.device_put(jax.random.randint(
        jax.random.key(1), (args.batch, args.prompt), 4, args.vocab), batch_sharding)
    mask = jax.device_put(jnp.ones((args.batch, args.prompt), jnp.int32), batch_sharding)

  def run(seed):
    with jax.set_mesh(mesh):
      out = sampler(params, prompts, mask, jax.random.key(seed))
      out.tokens.block_until_ready()
  return run


def build_hf(args):
  import torch
  import transformers
  torch.manual_seed(0)
  config = transformers.GPT2Config(vocab_size=args.vocab, n_embd=args.d_model,
                                   n_layer=args.layers, n_head=args.heads,
                                   n_positions=args.prompt + args.new_tokens)
  model = transformers.GPT2LMHeadModel(config).eval()
  prompts = torch.randint(4, args.vocab, (args.batch, args.prompt))

  def run(seed):
    torch.manual_seed(seed)
    with torch.inference_mode():
      model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                     temperature=0.7, top_k=0, max_new_tokens=args.new_tokens,
                     min_new_tokens=args.new_tokens, pad_token_id=0)
  return run


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--prompt", type=int, default=64)
  parser.add_argument("--new_tokens", type=int, default=64)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--d_model", type=int, default=256)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--vocab", type=int, default=8000)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--compare_hf", action="store_true")
  parser.add_argument("--scan_layers", action="store_true")
  parser.add_argument("--cpu_devices", type=int, default=1,
                      help="XLA CPU devices to split the host into (the batch is split "
                      "over them); must be set before jax starts, see the docstring")
  return parser.parse_args(argv)


def use_cpu_devices(n: int) -> None:
  """Splits the host CPU into n XLA devices; must run before jax's first device use."""
  if n > 1:
    jax.config.update("jax_num_cpu_devices", n)


def main():
  args = parse_args()
  use_cpu_devices(args.cpu_devices)

  runners = {"rlhf_jax": build_jax(args)}
  if args.compare_hf:
    runners["hf_generate"] = build_hf(args)
  for run in runners.values():
    run(0)  # compile / warm up
  times = {name: [] for name in runners}
  for i in range(args.repeats):
    for name, run in runners.items():
      start = time.perf_counter()
      run(i + 1)
      times[name].append(time.perf_counter() - start)
  new_tokens = args.batch * args.new_tokens
  print(f"devices: {jax.devices()}  jax {jax.__version__}")
  rates = {}
  for name, ts in times.items():
    median = statistics.median(ts)
    rates[name] = new_tokens / median
    print(f"{name:12s} median {median * 1e3:8.1f} ms  {rates[name]:10.0f} new tokens/s")
  if "hf_generate" in rates:
    print(f"speed-up rlhf_jax / hf_generate: {rates['rlhf_jax'] / rates['hf_generate']:.2f}x")


if __name__ == "__main__":
  main()
