"""`stage = "pipeline"`: SFT -> reward model -> PPO in one command.

Each stage runs in WORKDIR/<stage>/ with the config of its own section of
`config.pipeline` (data format, files, batch size, learning rate, steps) laid over
the shared fields (model, tokenizer, optimizer, mesh, ...), and reads the previous
stage's output: the RM starts from the SFT trunk and tokenizer, PPO from the SFT
policy and the RM. A stage whose summary.json exists is finished and skipped, and
an unfinished one resumes from its checkpoint, so re-running the command after an
interruption continues where it stopped.

With `pipeline.task = "synthetic"` (the bundled demo), the task's files are
written first, the RM's comparisons are sampled from the SFT policy and labelled
by the task's noisy gold labeler, and the run ends with a gold-judged evaluation
and a report (rlhf_jax/demo.py).
"""
from __future__ import annotations

import os

import ml_collections
from absl import logging

from rlhf_jax.errors import ConfigError

STAGE_ORDER = ("sft", "rm", "ppo")
SUMMARY_FILE = "summary.json"


def stage_finished(stage_dir: str) -> bool:
  return os.path.exists(os.path.join(stage_dir, SUMMARY_FILE))


def stage_config(config: ml_collections.ConfigDict, stage: str, workdir: str
                 ) -> ml_collections.ConfigDict:
  """The config one stage runs with: shared fields + `config.pipeline.<stage>`."""
  section = config.pipeline[stage]
  c = ml_collections.ConfigDict(config.to_dict())  # an unlocked deep copy
  del c["pipeline"]
  c.stage = stage
  c.data.format = section.format
  c.data.train_files, c.data.eval_files = section.train_files, section.eval_files
  if config.pipeline.task == "synthetic" and not section.train_files:
    from rlhf_jax import demo
    c.data.train_files, c.data.eval_files = demo.task_files(workdir)[stage]
  c.data.batch_size = section.batch_size
  c.data.eval_batch_size = section.batch_size
  c.optim.learning_rate = section.learning_rate
  c.optim.warmup_steps = section.warmup_steps
  sft_dir, rm_dir = (os.path.join(workdir, s) for s in ("sft", "rm"))
  if stage == "sft":
    c.sft.steps = section.steps
  elif stage == "rm":
    c.rm.steps = section.steps
    c.rm.init_checkpoint = sft_dir  # InstructGPT: the RM starts from the SFT model
  elif stage == "ppo":
    c.ppo.iterations = section.steps
    c.ppo.batch_size = section.batch_size  # prompts per iteration
    c.ppo.sft_checkpoint, c.ppo.rm_checkpoint = sft_dir, rm_dir
  if stage != "sft":
    c.tokenizer.path = os.path.join(sft_dir, "tokenizer.model")
  c.lock()
  return c


def pipeline_section(format: str, *, batch_size: int, learning_rate: float,
                     steps: int, warmup_steps: int = 0) -> ml_collections.ConfigDict:
  """One stage's part of `config.pipeline` (for config files)."""
  return ml_collections.ConfigDict(dict(
      format=format, train_files="", eval_files="", batch_size=batch_size,
      learning_rate=learning_rate, steps=steps, warmup_steps=warmup_steps))


def run_pipeline(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs the stages of `config.pipeline.stages` in order; returns the summary."""
  from rlhf_jax.trainers import run_stage  # the same validate + dispatch as one stage

  stages = [s.strip() for s in config.pipeline.stages.split(",") if s.strip()]
  unknown = [s for s in stages if s not in STAGE_ORDER]
  if unknown or not stages:
    raise ConfigError(f"config.pipeline.stages: {config.pipeline.stages!r} must list "
                      f"stages from {STAGE_ORDER}")
  synthetic = config.pipeline.task == "synthetic"
  if config.pipeline.task not in ("", "synthetic"):
    raise ConfigError(f"config.pipeline.task: {config.pipeline.task!r} is not '' or "
                      "'synthetic'")
  if synthetic:
    from rlhf_jax import demo
    demo.write_task(config, workdir)

  summaries = {}
  for stage in stages:
    stage_dir = os.path.join(workdir, stage)
    if synthetic and stage == "rm":
      demo.write_sampled_comparisons(config, workdir)
    if stage_finished(stage_dir):
      logging.info("pipeline: %s already finished in %s", stage, stage_dir)
      continue
    print(f"== pipeline stage {stage} in {stage_dir}", flush=True)
    run_stage(stage_config(config, stage, workdir), stage_dir)
  if synthetic and "ppo" in stages:  # the report compares the PPO policy with SFT
    summaries = demo.evaluate_and_report(config, workdir)
  return summaries
