"""Trainers: one function per stage, `fn(config, workdir)`; `run_stage` dispatches."""
from __future__ import annotations

import importlib

# Stage -> "module:function(config, workdir)". Imported lazily so `--help` is fast.
STAGE_RUNNERS = {
    "sft": "rlhf_jax.trainers.supervised:train_sft",
    "rm": "rlhf_jax.trainers.supervised:train_rm",
    "ppo": "rlhf_jax.trainers.ppo:train_ppo",
    "pipeline": "rlhf_jax.trainers.pipeline:run_pipeline",
}


def run_stage(config, workdir: str):
  """Validates the config, writes WORKDIR/config.json, runs its stage's trainer."""
  from rlhf_jax import config_base
  from rlhf_jax.trainers import common
  common.quiet_library_logs()
  config_base.validate(config)
  common.write_config(config, workdir)
  module_name, function_name = STAGE_RUNNERS[config.stage].split(":")
  return getattr(importlib.import_module(module_name), function_name)(config, workdir)
