"""Tiny end-to-end SFT / RM runs on the bundled synthetic task (no pytest here:
the kill -9 test's config file imports this module in a subprocess).

Batches of 8 split over conftest's eight CPU devices; sequences of 32 tokens; a
one-layer d_model 32 model; 12 steps (one epoch of 96 records).
"""
from rlhf_jax import config_base
from rlhf_jax.data import synthetic


def write_data(out_dir: str) -> dict[str, str]:
  return synthetic.write_task_files(out_dir, seed=0, n_train=96, n_eval=16)


def run_config(stage: str = "rm"):
  c = config_base.base_config()
  c.stage = stage
  c.data.format = "rankings" if stage == "rm" else "demonstrations"
  c.data.truncate = True
  c.data.prompt_len = 24
  c.data.response_len = 8
  c.data.batch_size = 8
  c.data.eval_batch_size = 8
  c.tokenizer.vocab_size = 300
  c.tokenizer.model_type = "unigram"
  c.model.d_model = 32
  c.model.n_layers = 1
  c.model.n_heads = 2
  c.model.n_kv_heads = 2
  c.model.d_ff = 64
  c.model.max_len = 32
  c.optim.learning_rate = 3e-3
  c.optim.warmup_steps = 2
  c.rm.steps = -1
  c.rm.eval_every_steps = 4
  c.rm.normalize = False
  c.sft.steps = -1
  c.sft.eval_every_steps = 4
  # Log every 2nd step: a stop at an odd step leaves half an interval to carry over.
  c.log.every_steps = 2
  c.log.progress_bar = False
  c.checkpoint.every_steps = 3
  c.checkpoint.keep = 2
  c.lock()
  return c


def set_files(config, paths: dict, cache_dir: str, stage: str = "rm"):
  kind = "comparisons" if stage == "rm" else "demos"
  config.data.train_files = paths[f"{kind}_train"]
  config.data.eval_files = paths[f"{kind}_eval"]
  config.data.cache_dir = cache_dir
  return config


def get_config(arg=None):
  """For `--config tests/supervised_run_fixtures.py` (files set by overrides)."""
  return run_config(arg or "rm")
