"""SFT and reward-model training: `train_sft(config, workdir)`, `train_rm(config, workdir)`.

Both stages are one loop over one jitted step; `_train` reads top to bottom:

  config -> mesh -> tokenizer and data -> model and optimizer -> shardings
  -> init or restore -> jit -> loop (log, eval, checkpoint) -> final eval -> save

A run writes into its workdir: config.json (as resolved, incl. the model's actual
vocabulary), tokenizer.model, metrics.jsonl and TensorBoard events, checkpoints/,
and at the end params/ (what the next stage loads; for the RM after reward
normalisation) and summary.json. Re-running the same command resumes from the
latest checkpoint with the model, optimizer, RNG, data position and the
half-finished log interval, and ends exactly where an uninterrupted run would.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from rlhf_jax import checkpoint, metrics, optim, sharding
from rlhf_jax.data import formats, pipeline
from rlhf_jax.errors import ConfigError
from rlhf_jax.models import heads, hf
from rlhf_jax.models.transformer import TransformerConfig
from rlhf_jax.steps import reward, sft
from rlhf_jax.trainers import common


@dataclasses.dataclass(frozen=True)
class Stage:
  """What differs between SFT and RM training; the loop is shared."""
  name: str
  model_cls: type
  loss_name: str
  make_step: Callable  # (model, tx, schedule, config) -> step(state, batch, rng)
  make_eval_step: Callable  # (model, config) -> eval_step(params, batch) -> sums
  eval_metrics: Callable  # summed eval outputs -> {'eval/...': float}
  host_batch: Callable  # numpy batch from the pipeline -> the step's batch


SFT = Stage(
    "sft", heads.PolicyModel, "loss/sft",
    lambda model, tx, schedule, c: sft.make_sft_step(
        model, tx, schedule, accum_steps=c.optim.accum_steps,
        include_prompt_loss=c.sft.include_prompt_loss),
    lambda model, c: sft.make_sft_eval_step(
        model, include_prompt_loss=c.sft.include_prompt_loss),
    sft.sft_eval_metrics,
    # Comparison data (hh, tldr, rankings) trains on each record's best response.
    sft.demonstrations_from_comparisons)

RM = Stage(
    "rm", heads.RewardModel, "loss/rm",
    lambda model, tx, schedule, c: reward.make_rm_step(
        model, tx, schedule, accum_steps=c.optim.accum_steps),
    lambda model, c: reward.make_rm_eval_step(model),
    reward.rm_eval_metrics,
    lambda batch: batch)


def train_sft(config: ml_collections.ConfigDict, workdir: str, *,
              stop_at_step: int | None = None) -> dict | None:
  """Supervised fine-tuning; returns the summary (None when stopped early)."""
  return _train(SFT, config, workdir, stop_at_step)


def train_rm(config: ml_collections.ConfigDict, workdir: str, *,
             stop_at_step: int | None = None) -> dict | None:
  """Reward-model training + normalisation; returns the summary (None when stopped)."""
  return _train(RM, config, workdir, stop_at_step)


def _train(stage: Stage, config, workdir: str, stop_at_step: int | None) -> dict | None:
  """The whole run. `stop_at_step` ends it after checkpointing that step (tests,
  or splitting a long run into jobs); re-running continues from there."""
  # ------------------------------------------------------------------ config
  common.quiet_library_logs()
  stage_config = config[stage.name]
  if not config.data.train_files:
    raise ConfigError("config.data.train_files: no files given")
  if stage is RM and config.data.format not in formats.COMPARISON_FORMATS:
    raise ConfigError(f"config.data.format: the reward model trains on comparisons "
                      f"{formats.COMPARISON_FORMATS}, not {config.data.format!r}")
  checkpoint.run_path(workdir).mkdir(parents=True, exist_ok=True)
  previous_stage = config.rm.init_checkpoint if stage is RM else ""

  # ------------------------------------------------------------------ mesh
  mesh = sharding.make_mesh(config.mesh)
  _check_batch_sizes(config, sharding.data_parallel_size(mesh))

  # ------------------------------------------------------------------ tokenizer and data
  if config.model.init_from and not (config.tokenizer.path or previous_stage):
    raise ConfigError("config.tokenizer.path: required with model.init_from (the "
                      "pretrained model's own sentencepiece model)")
  tokenizer = common.setup_tokenizer(config, workdir, previous_stage)
  base_model = None  # the architecture of the weights we start from, if any
  if previous_stage:
    base_model = TransformerConfig.from_config(
        common.read_run_config(previous_stage)["model"])
  elif config.model.init_from:
    base_model = hf.transformer_config_for(config.model)
  model_config = common.resolve_model_config(config, tokenizer, workdir, base_model)
  train_iter = pipeline.make_train_iterator(config.data, tokenizer)
  eval_iter = (pipeline.make_eval_iterator(config.data, tokenizer)
               if config.data.eval_files else None)
  eval_start = eval_iter.get_state() if eval_iter else None
  total_steps = _total_steps(stage, stage_config.steps, train_iter.num_batches)
  logging.info("%s: %d steps over %d training examples", stage.name, total_steps,
               train_iter.num_examples)

  # ------------------------------------------------------------------ model and optimizer
  model = stage.model_cls(model_config)
  tx, schedule = optim.make_optimizer(config.optim, total_steps)

  # ------------------------------------------------------------------ shardings
  state_shardings = common.state_sharding(model, tx, mesh)
  train_spec = _host_spec(stage, train_iter.element_spec)
  batch_shardings = sharding.batch_shardings(train_spec, mesh)
  eval_shardings = (sharding.batch_shardings(_host_spec(stage, eval_iter.element_spec), mesh)
                    if eval_iter else None)
  replicated = sharding.replicated(mesh)

  with jax.set_mesh(mesh):
    # ---------------------------------------------------------------- init or restore
    ckpt = checkpoint.Checkpointer(workdir, keep=config.checkpoint.keep,
                                   async_save=config.checkpoint.async_save)
    start_step = ckpt.latest_step()
    if start_step is None:
      start_step, extra = 0, {}
      init_params = None
      if previous_stage:  # InstructGPT: the RM starts from the SFT model's trunk
        _, previous_params, _ = common.load_stage_params(previous_stage, mesh)
        init_params = {"trunk": previous_params["trunk"]}
      elif config.model.init_from:  # a pretrained HF checkpoint
        pretrained = hf.load_pretrained_params(config.model.init_from, model_config, mesh)
        init_params = pretrained if stage is SFT else {"trunk": pretrained["trunk"]}
      state = common.init_train_state(model, tx, jax.random.key(config.seed),
                                      state_shardings, init_params)
    else:
      logging.info("resuming from step %d of %s", start_step, ckpt.directory)
      abstract = common.abstract_state(model, tx, state_shardings, jax.random.key(0))
      items, extra = ckpt.restore(start_step, checkpoint.split_state(abstract))
      state = checkpoint.join_state(items)
      train_iter.set_state(_local_data_state(extra["data"]))
    run_rng = jax.random.fold_in(state.rng, 0)  # a copy: state.rng is donated each step

    # ---------------------------------------------------------------- jit
    train_step = jax.jit(stage.make_step(model, tx, schedule, config),
                         in_shardings=(state_shardings, batch_shardings, replicated),
                         out_shardings=(state_shardings, replicated), donate_argnums=(0,))
    eval_step = jax.jit(stage.make_eval_step(model, config),
                        in_shardings=(state_shardings.params, eval_shardings),
                        out_shardings=replicated)

    def evaluate(params) -> dict[str, float]:
      return _evaluate(stage, eval_step, params, eval_iter, eval_start,
                       stage_config.eval_batches, mesh)

    # ---------------------------------------------------------------- loop
    writer = metrics.MetricsWriter(workdir, start_step=start_step,
                                   tensorboard=config.log.tensorboard)
    buffer = metrics.MetricsBuffer.from_host_state(extra.get("pending_metrics"))
    last_eval, last_log = extra.get("last_eval", {}), extra.get("last_log", {})
    throughput = metrics.Throughput(_tokens_per_step(train_spec))
    progress = metrics.Progress(total_steps, start_step, config.log.progress_bar, stage.name)
    last_saved = start_step or None
    end_step = min(total_steps, stop_at_step or total_steps)
    try:
      for step in range(start_step + 1, end_step + 1):
        batch = sharding.shard_batch(stage.host_batch(next(train_iter)), mesh)
        state, step_metrics = train_step(state, batch, common.per_step_rng(run_rng, step))
        buffer.add(step_metrics)
        throughput.step()
        record = {}
        if step % config.log.every_steps == 0 or step == total_steps:
          common.check_finite(state, stage.loss_name, last_saved, workdir)
          last_log = buffer.pop_mean()
          record.update(last_log, **throughput.pop())
        if eval_iter and (step % stage_config.eval_every_steps == 0 or step == total_steps):
          last_eval = evaluate(state.params)
          record.update(last_eval)
          throughput.reset()  # eval time is not training throughput
        if record:
          writer.write(step, record)
          progress.update(step, {k: v for k, v in record.items()
                                 if k in (stage.loss_name, "eval/" + stage.loss_name,
                                          "rm/accuracy", "eval/rm/accuracy")})
        if step % config.checkpoint.every_steps == 0 or step in (total_steps, end_step):
          common.check_finite(state, stage.loss_name, last_saved, workdir)
          ckpt.save(step, checkpoint.split_state(state), {
              "data": train_iter.get_state(), "pending_metrics": buffer.host_state(),
              "last_eval": last_eval, "last_log": last_log})
          last_saved = step
    finally:  # also on errors: finish writing the last good checkpoint
      progress.close()
      writer.close()
      ckpt.close()
    if end_step < total_steps:
      logging.info("stopped at step %d of %d; re-run to continue", end_step, total_steps)
      return None

    # ---------------------------------------------------------------- final eval and save
    params = state.params
    summary = {"stage": stage.name, "steps": total_steps,
               "model": {"params": model_config.param_count(),
                         "vocab_size": model_config.vocab_size},
               stage.name: _val_metrics(stage, last_eval),
               "train": last_log,
               "data": {"train": train_iter.counts.as_dict(),
                        "eval": eval_iter.counts.as_dict() if eval_iter else None}}
    if stage is RM and config.rm.normalize:
      params, summary["rm"]["normalization"] = _normalize_rewards(
          config, model, params, tokenizer, mesh, state_shardings.params)
    checkpoint.save_params(workdir, params)
  path = metrics.write_summary(workdir, summary)
  if common.is_main():
    shown = ", ".join(f"{stage.name}.{k} {v:.4g}" for k, v in summary[stage.name].items()
                      if isinstance(v, float))
    print(f"{stage.name} done at step {total_steps}: {shown or 'no eval files'}; "
          f"summary: {path}")
  return summary


# --------------------------------------------------------------------------------
# Helpers of the loop above
# --------------------------------------------------------------------------------


def _check_batch_sizes(config, data_parallel: int) -> None:
  """Global batches must split evenly over devices (and micro-batches)."""
  accum = config.optim.accum_steps
  if config.data.batch_size % (data_parallel * accum):
    raise ConfigError(
        f"config.data.batch_size: {config.data.batch_size} is not a multiple of the "
        f"{data_parallel} data-parallel devices x optim.accum_steps={accum}")
  if config.data.eval_files and config.data.eval_batch_size % data_parallel:
    raise ConfigError(f"config.data.eval_batch_size: {config.data.eval_batch_size} is not "
                      f"a multiple of the {data_parallel} data-parallel devices")


def _total_steps(stage: Stage, steps: int, num_batches: int | None) -> int:
  """Optimizer steps of the run: `steps`, or -1 for one pass over the data."""
  field = f"config.{stage.name}.steps"
  if steps <= 0:
    if num_batches is None:
      raise ConfigError(f"{field}: -1 (every batch once) needs data.num_epochs > 0")
    return num_batches
  if num_batches is not None and steps > num_batches:
    raise ConfigError(
        f"{field}: {steps} steps need {steps} batches, but data.train_files x "
        f"data.num_epochs give {num_batches}; use -1 for all of them or "
        f"data.num_epochs=0 to repeat the data")
  return steps


def _host_spec(stage: Stage, element_spec: dict) -> dict:
  """Shapes of the step's batch: the pipeline's, after `stage.host_batch`."""
  zeros = {k: np.zeros(v.shape, v.dtype) for k, v in element_spec.items()}
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
          for k, v in stage.host_batch(zeros).items()}


def _tokens_per_step(spec: dict) -> int:
  """Tokens the model processes per step (padding included), all processes."""
  per_sequence = spec["prompt_tokens"].shape[-1] + spec["response_tokens"].shape[-1]
  sequences = int(np.prod(spec["response_tokens"].shape[:-1]))
  return sequences * per_sequence * jax.process_count()


def _local_data_state(state: dict) -> dict:
  """The checkpointed iterator state (written by process 0) for this process.

  All processes advance in lockstep through their own shard, so the position
  is the same on every process; only the process index in the identity differs.
  """
  state = dict(state, identity=dict(state["identity"]))
  if "process" in state["identity"]:
    state["identity"]["process"] = [jax.process_index(), state["identity"]["process"][1]]
  return state


def _evaluate(stage: Stage, eval_step, params, eval_iter, start_state, max_batches: int,
              mesh) -> dict[str, float]:
  """One pass over the eval set (or its first `max_batches`), summed exactly."""
  eval_iter.set_state(start_state)
  totals = None
  for i, batch in enumerate(eval_iter):
    if max_batches and i >= max_batches:
      break
    sums = eval_step(params, sharding.shard_batch(stage.host_batch(batch), mesh))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  return stage.eval_metrics(jax.device_get(totals))


def _val_metrics(stage: Stage, eval_metrics: dict) -> dict[str, float]:
  """'eval/rm/accuracy' -> 'val_accuracy', 'eval/loss/rm' -> 'val_loss' (summary.json)."""
  out = {}
  for key, value in eval_metrics.items():
    name = key.split("/")[-1] if not key.startswith("eval/loss/") else "loss"
    out[f"val_{name}"] = value
  return out


def _normalize_rewards(config, model, params, tokenizer, mesh, params_shardings
                       ) -> tuple[Any, dict]:
  """Sets the RM's gain/bias so reference responses score mean 0 (std 1).

  The reference responses are the demonstrations in `rm.normalize_files` when
  given (InstructGPT), else the best-ranked response of each training record
  (Stiennon et al.: reference summaries), read from the first
  `rm.normalize_batches` batches of a fresh pass over the training data.
  """
  data_config = ml_collections.ConfigDict(config.data.to_dict())
  data_config.num_epochs = 1
  if config.rm.normalize_files:
    data_config.format, data_config.train_files = "demonstrations", config.rm.normalize_files
  data = pipeline.make_train_iterator(data_config, tokenizer, prefetch=0)
  spec = _host_spec(SFT, data.element_spec)
  score = jax.jit(reward.make_score_fn(model),
                  in_shardings=(params_shardings, sharding.batch_shardings(spec, mesh)),
                  out_shardings=sharding.batch_sharding(mesh, 1))
  rewards, weights = [], []
  for i, batch in enumerate(data):
    if i >= config.rm.normalize_batches:
      break
    batch = sharding.shard_batch(sft.demonstrations_from_comparisons(batch), mesh)
    gathered = multihost_utils.process_allgather((score(params, batch), batch["weight"]),
                                                 tiled=True)
    rewards.append(np.asarray(gathered[0]))
    weights.append(np.asarray(gathered[1]))
  report = reward.normalized_gain_bias(
      np.concatenate(rewards), np.concatenate(weights), float(params["gain"]),
      float(params["bias"]), config.rm.normalize_gain)
  report["source"] = config.rm.normalize_files or "best-ranked training responses"
  params = dict(params)
  for name in ("gain", "bias"):
    params[name] = jax.device_put(jnp.asarray(report[name], params[name].dtype),
                                  params_shardings[name])
  logging.info("reward normalisation: mean %.4g std %.4g over %d responses -> gain %.4g "
               "bias %.4g", report["mean_before"], report["std_before"],
               report["num_responses"], report["gain"], report["bias"])
  return params, report
