"""New tokens/s of the KV-cache sampler, side by side with Hugging Face `generate`.

  python benchmarks/sampler.py                 # rlhf_jax only
  python benchmarks/sampler.py --compare_hf    # also transformers' generate (torch CPU)

Shape (the issue's reference): GPT-2 family, 4 layers, d_model 256, 4 heads, vocab
8000; batch 32, prompt 64, 64 new tokens, temperature 0.7. No stop token, so every
row generates all 64 tokens in both stacks. Medians over --repeats runs, alternating.
"""
from rlhf_jax import host_memory

# As the trainer does, before jax starts its threads (rlhf_jax/host_memory.py).
host_memory.configure_for_this_host()

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import sampling
from rlhf_jax.models import heads
from rlhf_jax.models.transformer import TransformerConfig


def build_jax(args):
  config = TransformerConfig.from_config(dict(
      family="gpt2", vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers,
      n_heads=args.heads, n_kv_heads=args.heads, d_ff=4 * args.d_model,
      max_len=args.prompt + args.new_tokens, dtype=args.dtype, scan_layers=args.scan_layers))
  model = heads.PolicyModel(config)
  params = jax.jit(lambda r: model.init(r, jnp.ones((1, 4), jnp.int32))["params"])(
      jax.random.key(0))
  sampler = sampling.make_sampler(model, sampling.SamplingParams(
      new_tokens=args.new_tokens, stop_token=-1, temperature=0.7))
  prompts = jax.random.randint(jax.random.key(1), (args.batch, args.prompt), 4, args.vocab)
  mask = jnp.ones_like(prompts)

  def run(seed):
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
  return parser.parse_args(argv)


def main():
  args = parse_args()

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
