"""Data throughput: HH preference pairs tokenized and batched, in examples/s.

    python benchmarks/data.py                      # one core (pinned), vocab 8000
    python benchmarks/data.py --cores 0 --prefetch 4   # all cores, 4 threads

Two figures:
  encode    Examples already in memory -> padded numpy batches (sentencepiece
            batched encode + vectorised padding): the tokenizing-and-batching cost.
  pipeline  the whole training iterator: array_record read + proto decode +
            encode, shuffled and batched by grain, no prefetch threads.
The goal is >= 5,000 pairs/s on one core, far above what a small RM consumes.
Reads ../shared/data/hh-rlhf/harmless-base-test.jsonl.gz (2,312 pairs) unless
--files says otherwise.
"""
import argparse
import os
import pathlib
import tempfile
import time

from rlhf_jax.data import formats, pipeline
from rlhf_jax.data.tokenizer import Tokenizer

HH = pathlib.Path(__file__).resolve().parents[2] / "shared/data/hh-rlhf/harmless-base-test.jsonl.gz"


class Clock:
  """Wall time and this process's CPU time: on a shared machine the CPU-time
  rate is the one-core figure; wall time also counts waiting for other jobs."""

  def __init__(self):
    self.wall, self.cpu = time.perf_counter(), time.process_time()

  def rates(self, n: int) -> str:
    wall, cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
    return f"{n / cpu:8,.0f} pairs/s per CPU-second ({n / wall:,.0f}/s wall)"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--files", default=str(HH))
  parser.add_argument("--vocab", type=int, default=8000)
  parser.add_argument("--model_type", default="unigram")
  parser.add_argument("--prompt_len", type=int, default=256)
  parser.add_argument("--response_len", type=int, default=128)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--epochs", type=int, default=3)
  parser.add_argument("--cores", type=int, default=1, help="pin to this many cores (0: all)")
  parser.add_argument("--prefetch", type=int, default=0,
                      help="pipeline threads (sentencepiece releases the GIL, so they scale)")
  args = parser.parse_args()
  if args.cores:
    os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:args.cores]))

  cfg = pipeline.default_data_config()
  cfg.update(format="hh", train_files=args.files, prompt_len=args.prompt_len,
             response_len=args.response_len, batch_size=args.batch_size,
             num_epochs=args.epochs, truncate=True, cache_dir=tempfile.mkdtemp())
  examples = list(pipeline.read_examples(cfg))
  tok = Tokenizer.train(formats.example_texts(examples), args.vocab, model_type=args.model_type)
  print(f"{len(examples)} pairs, {args.model_type} vocab {tok.vocab_size}, "
        f"P={args.prompt_len} R={args.response_len} B={args.batch_size}, "
        f"cores={len(os.sched_getaffinity(0))}")

  encoder = pipeline.Encoder(cfg, tok)
  b = args.batch_size
  clock = Clock()
  for _ in range(args.epochs):
    for i in range(0, len(examples) - b + 1, b):
      encoder.batch(examples[i:i + b])
  print(f"encode:   {clock.rates(args.epochs * (len(examples) // b) * b)} (tokenize + pad)")

  it = pipeline.make_train_iterator(cfg, tok, process_index=0, process_count=1,
                                    prefetch=args.prefetch)
  next(it)  # build + length scan happen at construction; time the steady state
  clock, count = Clock(), 0
  for batch in it:
    count += len(batch["weight"])
  print(f"pipeline: {clock.rates(count)} "
        "(array_record read + decode + tokenize + pad, grain batches)")
  print(f"counts: {it.counts}")


if __name__ == "__main__":
  main()
