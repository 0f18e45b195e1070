"""PPO against a reward model: `train_ppo(config, workdir)`.

Reads top to bottom:

  config -> mesh -> previous stages (SFT policy + tokenizer, RM) -> data
  -> models, optimizers, shardings -> init or restore -> jit
  -> loop: rollout (sample) -> score (ref / value / RM forwards, rewards, GAE)
           -> update (epochs x minibatches) -> KL controller -> log, eval, checkpoint
  -> final eval -> export the policy -> summary.json

Four param trees live on one mesh: the policy (initialised from the SFT params),
the frozen reference policy (the SFT params), the value network (initialised from
the RM, its head kept or re-initialised per `ppo.value_head`) and the frozen RM.
Only the policy and the value network (and their optimizer states, and the EMA
of the policy) are checkpointed; the frozen trees are re-read from the SFT and RM
runs on resume. The KL controller runs on the host and its state (beta) is saved
with every checkpoint, as are the data iterators' positions and the metrics of
an unfinished log interval, so a resumed run ends exactly where an uninterrupted
one would, beta included.

The per-iteration metrics are fetched to the host every iteration: the adaptive
KL controller needs the measured KL before the next rollout. They are a few
scalars; the rollout batch itself never leaves the device.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from rlhf_jax import checkpoint, evaluation, kl_control, metrics, optim, sampling, sharding
from rlhf_jax.data import pipeline
from rlhf_jax.errors import ConfigError
from rlhf_jax.models import heads
from rlhf_jax.steps import ppo as ppo_lib
from rlhf_jax.steps import rollout as rollout_lib
from rlhf_jax.trainers import common

# Metrics whose non-finite value stops the run (the update has then gone wrong).
_MUST_BE_FINITE = ("loss/policy", "loss/value", "loss/total", "ppo/kl", "ppo/score",
                   "ppo/grad_norm_policy", "ppo/grad_norm_value")


def train_ppo(config: ml_collections.ConfigDict, workdir: str, *,
              reward_fn: Optional[rollout_lib.RewardFn] = None,
              stop_at_iteration: Optional[int] = None) -> Optional[dict]:
  """The whole PPO run; returns the summary (None when stopped early).

  Args:
    reward_fn: a programmatic reward used instead of the RM (see rollout.RewardFn);
      ppo.rm_checkpoint may then be '' (the critic starts from the SFT trunk).
    stop_at_iteration: end after checkpointing this iteration (tests).
  """
  p = config.ppo
  if common.is_main():
    os.makedirs(workdir, exist_ok=True)
  # ------------------------------------------------------------------ mesh and sizes
  mesh = sharding.make_mesh(config.mesh)
  _check_sizes(config, sharding.data_parallel_size(mesh))

  # ------------------------------------------------------------------ previous stages
  if not p.sft_checkpoint:
    raise ConfigError("config.ppo.sft_checkpoint: give the workdir of a finished SFT run")
  if not p.rm_checkpoint and reward_fn is None:
    raise ConfigError("config.ppo.rm_checkpoint: give the workdir of a finished RM run")
  sft_model_config, sft_params, sft_tokenizer = common.load_stage_params(
      p.sft_checkpoint, mesh, heads.PolicyModel)
  tokenizer = common.setup_tokenizer(config, workdir, previous_stage=p.sft_checkpoint)
  if tokenizer.fingerprint != sft_tokenizer.fingerprint:
    raise ConfigError(f"config.tokenizer.path: {config.tokenizer.path} is not the tokenizer "
                      f"of the SFT run {p.sft_checkpoint}")
  policy_config = common.resolve_model_config(config, tokenizer, workdir,
                                              base=sft_model_config)
  if config.data.prompt_len + config.rollout.new_tokens > policy_config.max_len:
    raise ConfigError(
        f"config.rollout.new_tokens: {config.rollout.new_tokens} + data.prompt_len="
        f"{config.data.prompt_len} exceed the SFT model's max_len={policy_config.max_len}")
  reward_params = None
  if p.rm_checkpoint:
    rm_model_config, reward_params, rm_tokenizer = common.load_stage_params(
        p.rm_checkpoint, mesh, heads.RewardModel)
    if rm_tokenizer.fingerprint != tokenizer.fingerprint:
      raise ConfigError(f"config.ppo.rm_checkpoint: {p.rm_checkpoint} was trained with a "
                        f"different tokenizer than the SFT run {p.sft_checkpoint}")
    # The critic starts as a copy of the RM (Stiennon et al.; InstructGPT).
    _, value_params, _ = common.load_stage_params(p.rm_checkpoint, mesh, heads.ValueModel)
  else:
    rm_model_config, value_params = sft_model_config, None
  local = {k: getattr(policy_config, k) for k in ("dtype", "remat")}
  value_config = dataclasses.replace(rm_model_config, **local)

  # ------------------------------------------------------------------ data
  prompt_iter = _prompt_iterator(config, tokenizer)
  eval_iter = (pipeline.make_eval_iterator(_prompt_data_config(config), tokenizer)
               if config.data.eval_files else None)
  eval_start = eval_iter.get_state() if eval_iter else None
  ptx_iter = _ptx_iterator(config, tokenizer) if p.gamma_ptx > 0 else None
  ptx_eval_iter = None
  if p.ptx_eval_files:
    ptx_eval_cfg = _text_data_config(config, p.ptx_eval_files, config.data.eval_batch_size)
    ptx_eval_cfg.eval_files = p.ptx_eval_files
    ptx_eval_iter = pipeline.make_eval_iterator(ptx_eval_cfg, tokenizer)
  ptx_eval_start = ptx_eval_iter.get_state() if ptx_eval_iter else None

  # ------------------------------------------------------------------ models and optimizers
  models = rollout_lib.Models(heads.PolicyModel(policy_config), heads.ValueModel(value_config),
                              heads.RewardModel(value_config) if reward_params else None)
  up = ppo_lib.UpdateParams.from_config(config)
  total_updates = p.iterations * p.epochs * p.minibatches
  tx, _ = optim.make_optimizer(config.optim, total_updates)  # one each for policy, value
  sampling_params = sampling.SamplingParams.from_config(
      config.rollout, stop_token=tokenizer.eos_id, pad_token=tokenizer.pad_id)
  scoring = rollout_lib.ScoringParams.from_config(config, stop_token=tokenizer.eos_id)

  # ------------------------------------------------------------------ shardings
  abstract_policy, policy_sh = common.param_sharding(models.policy, mesh)
  abstract_value, value_sh = common.param_sharding(models.value, mesh)
  replicated = sharding.replicated(mesh)
  batch_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
  state_sh = ppo_lib.state_sharding(tx, tx, abstract_policy, abstract_value, policy_sh,
                                    value_sh, replicated, ema=p.ema_decay > 0)
  params_sh = {"policy": policy_sh, "reference": policy_sh, "value": value_sh}
  if reward_params is not None:
    params_sh["reward"] = value_sh

  with jax.set_mesh(mesh):
    # ---------------------------------------------------------------- init or restore
    ckpt = checkpoint.Checkpointer(workdir, keep=config.checkpoint.keep,
                                   async_save=config.checkpoint.async_save)
    start = ckpt.latest_step()
    init = jax.jit(lambda pol, val: ppo_lib.init_state(pol, val, tx, tx, p.ema_decay),
                   in_shardings=(policy_sh, value_sh), out_shardings=state_sh)
    kl_ctl = kl_control.make_kl_controller(p)
    if start is None:
      start, extra = 0, {}
      if value_params is None:
        value_params = _value_from_trunk(models.value, sft_params, value_sh, config.seed)
      elif p.value_head == "reinit":
        value_params = _reinit_value_head(models.value, value_params, value_sh, config.seed)
      state = init(sft_params, value_params)
    else:
      logging.info("resuming PPO from iteration %d of %s", start, ckpt.directory)
      abstract = checkpoint.abstract_tree(
          jax.eval_shape(init, abstract_policy, abstract_value), state_sh)
      items, extra = ckpt.restore(start, _split_state(abstract))
      state = items["train"].replace(policy=items["params"])
      prompt_iter.set_state(_local_data_state(extra["data"]))
      if ptx_iter is not None:
        ptx_iter.set_state(_local_data_state(extra["ptx_data"]))
      kl_ctl.load_state_dict(extra["kl_controller"])
    del value_params  # the state holds the critic now

    # ---------------------------------------------------------------- jit
    rollout_fns = rollout_lib.make_rollout_fns(
        models, sampling_params, scoring, reward_fn=reward_fn, params_sharding=params_sh,
        batch_sharding=batch_sh, replicated=replicated)
    update = ppo_lib.make_update(models.policy, models.value, tx, tx, up,
                                 state_sharding=state_sh, batch_sharding=batch_sh,
                                 ptx_sharding=ppo_lib.ptx_sharding_for(mesh),
                                 replicated=replicated)
    judge, score_fn = evaluation.load_judge(p.eval_judge)
    evaluator = evaluation.PPOEvaluator(models, rollout_fns.generate, scoring,
                                        tokenizer=tokenizer, judge=judge, score_fn=score_fn,
                                        best_of_n=p.eval_best_of_n, reward_fn=reward_fn)
    run_rng = jax.random.key(config.seed)
    eval_rng = jax.random.fold_in(run_rng, 0)  # iterations use 1, 2, ...; evals share one key

    def evaluate(state) -> dict[str, float]:
      params = {"policy": state.ema if state.ema is not None else state.policy,
                "reference": sft_params}
      if reward_params is not None:
        params["reward"] = reward_params
      prompts = _batches(eval_iter, eval_start, p.eval_batches, mesh) if eval_iter else ()
      texts = (_batches(ptx_eval_iter, ptx_eval_start, p.eval_batches, mesh)
               if ptx_eval_iter else ())
      return evaluator.evaluate(params, prompts, eval_rng, texts)

    # ---------------------------------------------------------------- loop
    writer = metrics.MetricsWriter(workdir, start_step=start,
                                   tensorboard=config.log.tensorboard)
    buffer = metrics.MetricsBuffer.from_host_state(extra.get("pending_metrics"))
    last_eval, last_log = extra.get("last_eval", {}), extra.get("last_log", {})
    progress = metrics.Progress(p.iterations, start, config.log.progress_bar, "ppo")
    tokens = _tokens_per_iteration(config)
    last_saved = start or None
    end = min(p.iterations, stop_at_iteration or p.iterations)
    for it in range(start + 1, end + 1):
      host_batch = next(prompt_iter)
      prompts = sharding.shard_batch(
          {k: host_batch[k] for k in ("prompt_tokens", "prompt_mask")}, mesh)
      ptx = _ptx_batch(ptx_iter, config, mesh) if ptx_iter is not None else None
      sample_rng, update_rng = jax.random.split(jax.random.fold_in(run_rng, it))
      params = {"policy": state.policy, "reference": sft_params, "value": state.value}
      if reward_params is not None:
        params["reward"] = reward_params

      t0 = time.perf_counter()
      samples = jax.block_until_ready(rollout_fns.generate(
          state.policy, prompts["prompt_tokens"], prompts["prompt_mask"], sample_rng))
      t1 = time.perf_counter()
      batch, rollout_metrics = jax.block_until_ready(rollout_fns.score(
          params, prompts["prompt_tokens"], prompts["prompt_mask"], samples,
          np.float32(kl_ctl.value)))
      t2 = time.perf_counter()
      if config.log.samples_per_iteration:
        _log_samples(workdir, it, tokenizer, host_batch, samples,
                     config.log.samples_per_iteration)
      del params, samples  # the update donates the state the params point into
      state, update_metrics = jax.block_until_ready(update(state, batch, ptx, update_rng))
      t3 = time.perf_counter()
      del batch

      host = {k: float(v) for k, v in
              jax.device_get({**rollout_metrics, **update_metrics}).items()}
      _check_finite(host, it, last_saved, workdir)
      kl_ctl.update(host["ppo/kl"], p.batch_size)
      host.update(_perf(tokens, t1 - t0, t2 - t1, t3 - t2))
      buffer.add(host)

      record = {}
      if it % config.log.every_steps == 0 or it == p.iterations:
        last_log = buffer.pop_mean()
        record.update(last_log)
      if (eval_iter or ptx_eval_iter) and (it % p.eval_every_iterations == 0
                                           or it == p.iterations):
        last_eval = evaluate(state)
        record.update(last_eval)
      if record:
        writer.write(it, record)
        progress.update(it, {k: record[k] for k in ("ppo/score", "ppo/kl", "ppo/beta",
                                                    "eval/score") if k in record})
      if it % config.checkpoint.every_steps == 0 or it in (p.iterations, end):
        extra = {"data": prompt_iter.get_state(), "kl_controller": kl_ctl.state_dict(),
                 "pending_metrics": buffer.host_state(), "last_eval": last_eval,
                 "last_log": last_log}
        if ptx_iter is not None:
          extra["ptx_data"] = ptx_iter.get_state()
        ckpt.save(it, _split_state(state), extra)
        last_saved = it
    progress.close()
    writer.close()
    ckpt.close()
    if end < p.iterations:
      logging.info("stopped at iteration %d of %d; re-run to continue", end, p.iterations)
      return None

    # ---------------------------------------------------------------- export and summary
    final_policy = state.ema if state.ema is not None else state.policy
    checkpoint.save_params(workdir, final_policy)
  summary = {
      "stage": "ppo", "iterations": p.iterations, "episodes": p.iterations * p.batch_size,
      "model": {"params": policy_config.param_count(), "vocab_size": policy_config.vocab_size},
      "ppo": {k.removeprefix("eval/"): v for k, v in last_eval.items()},
      "train": {k: v for k, v in last_log.items() if not k.startswith("perf/")},
      "kl_controller": kl_ctl.state_dict(),
      "exported": "ema" if p.ema_decay > 0 else "policy",
      "data": {"prompts": prompt_iter.counts.as_dict(),
               "eval": eval_iter.counts.as_dict() if eval_iter else None},
  }
  path = metrics.write_summary(workdir, summary)
  if common.is_main():
    shown = ", ".join(f"{k} {v:.4g}" for k, v in summary["ppo"].items()
                      if k in ("score", "kl", "win_rate_vs_sft", "win_rate_vs_reference"))
    print(f"ppo done after {p.iterations} iterations (beta {kl_ctl.value:.4g}): "
          f"{shown or 'no eval files'}; summary: {path}")
  return summary


# --------------------------------------------------------------------------------
# Helpers of the run above
# --------------------------------------------------------------------------------


def _check_sizes(config, data_parallel: int) -> None:
  """Every micro-batch (and pretraining micro-batch) splits evenly over devices."""
  p, accum = config.ppo, config.optim.accum_steps
  if config.data.format != "prompts":
    raise ConfigError(f"config.data.format: PPO reads 'prompts', not {config.data.format!r}")
  micro = p.batch_size // (p.minibatches * accum)
  if p.batch_size % (p.minibatches * accum) or micro % data_parallel:
    raise ConfigError(
        f"config.ppo.batch_size: {p.batch_size} must split into ppo.minibatches="
        f"{p.minibatches} x optim.accum_steps={accum} micro-batches, each a multiple of "
        f"the {data_parallel} data-parallel devices")
  if p.batch_size % data_parallel:
    raise ConfigError(f"config.ppo.batch_size: {p.batch_size} is not a multiple of the "
                      f"{data_parallel} data-parallel devices")
  if p.gamma_ptx > 0:
    if not p.ptx_files:
      raise ConfigError("config.ppo.ptx_files: gamma_ptx > 0 needs pretraining text files")
    if p.ptx_batch_size % accum or (p.ptx_batch_size // accum) % data_parallel:
      raise ConfigError(
          f"config.ppo.ptx_batch_size: {p.ptx_batch_size} must split into optim.accum_steps="
          f"{accum} micro-batches, each a multiple of the {data_parallel} data-parallel "
          "devices")
  if config.data.eval_files and config.data.eval_batch_size % data_parallel:
    raise ConfigError(f"config.data.eval_batch_size: {config.data.eval_batch_size} is not "
                      f"a multiple of the {data_parallel} data-parallel devices")


def _prompt_data_config(config) -> ml_collections.ConfigDict:
  """config.data for the prompt pipelines: one batch is one iteration's prompts."""
  c = ml_collections.ConfigDict(config.data.to_dict())
  c.batch_size = config.ppo.batch_size
  return c


def _prompt_iterator(config, tokenizer) -> pipeline.DataIterator:
  it = pipeline.make_train_iterator(_prompt_data_config(config), tokenizer)
  if it.num_batches is not None and it.num_batches < config.ppo.iterations:
    raise ConfigError(
        f"config.ppo.iterations: {config.ppo.iterations} iterations need as many batches of "
        f"ppo.batch_size={config.ppo.batch_size} prompts, but data.train_files x "
        f"data.num_epochs give {it.num_batches}; set data.num_epochs=0 to repeat the prompts")
  return it


def _text_data_config(config, files: str, batch_size: int) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(config.data.to_dict())
  c.format, c.train_files, c.eval_files = "text", files, ""
  c.batch_size, c.eval_batch_size = batch_size, batch_size
  c.num_epochs = 0  # pretraining text repeats for as long as PPO runs
  return c


def _ptx_iterator(config, tokenizer) -> pipeline.DataIterator:
  """Pretraining text: each batch holds one iteration's epochs x minibatches x N."""
  p = config.ppo
  size = p.epochs * p.minibatches * p.ptx_batch_size
  return pipeline.make_train_iterator(_text_data_config(config, p.ptx_files, size), tokenizer)


def _ptx_batch(ptx_iter, config, mesh) -> dict[str, jax.Array]:
  """[E*M*N, T] host batch -> [E, M, N, T], N split over the batch mesh axes."""
  p = config.ppo
  host = next(ptx_iter)
  shape = (p.epochs, p.minibatches, -1)
  local = {k: np.asarray(host[k]).reshape(shape + host[k].shape[1:]) for k in ("tokens", "mask")}
  sh = ppo_lib.ptx_sharding_for(mesh)
  return {k: jax.make_array_from_process_local_data(sh, v) for k, v in local.items()}


def _batches(data_iter, start_state, max_batches: int, mesh):
  """One (possibly partial) pass over an eval iterator, sharded."""
  data_iter.set_state(start_state)
  for i, batch in enumerate(data_iter):
    if max_batches and i >= max_batches:
      return
    yield sharding.shard_batch(batch, mesh)


def _split_state(state: ppo_lib.PPOState) -> dict[str, Any]:
  """Checkpoint items: 'params' is the policy (what a later stage loads from an
  unfinished PPO run, like SFT's params), 'train' the rest of the state."""
  return {"params": state.policy, "train": state.replace(policy=None)}


def _local_data_state(state: dict) -> dict:
  """The checkpointed iterator state (written by process 0) for this process."""
  state = dict(state, identity=dict(state["identity"]))
  if "process" in state["identity"]:
    state["identity"]["process"] = [jax.process_index(), state["identity"]["process"][1]]
  return state


def _fresh_head(value_model, seed: int):
  """A freshly initialised scalar head (normal(0, 1/sqrt(d+1)), zero bias), gain 1,
  bias 0: what `ppo.value_head = 'reinit'` puts on top of the RM trunk."""
  fresh = nn.meta.unbox(value_model.init(jax.random.key(seed), jnp.ones((1, 2), jnp.int32))
                        ["params"])
  return {k: fresh[k] for k in ("head", "gain", "bias")}


def _reinit_value_head(value_model, value_params, value_sh, seed: int):
  fresh = jax.jit(lambda: _fresh_head(value_model, seed),
                  out_shardings={k: value_sh[k] for k in ("head", "gain", "bias")})()
  return {**value_params, **fresh}


def _value_from_trunk(value_model, policy_params, value_sh, seed: int):
  """No RM (a reward_fn run): the critic is the SFT trunk plus a fresh head."""
  fresh = jax.jit(lambda: _fresh_head(value_model, seed),
                  out_shardings={k: value_sh[k] for k in ("head", "gain", "bias")})()
  trunk = jax.jit(lambda t: jax.tree.map(jnp.copy, t),
                  out_shardings=value_sh["trunk"])(policy_params["trunk"])
  return {"trunk": trunk, **fresh}


def _tokens_per_iteration(config) -> dict[str, int]:
  p = config.ppo
  sequence = config.data.prompt_len + config.rollout.new_tokens
  return {"sampled": p.batch_size * config.rollout.new_tokens,
          "scored": p.batch_size * sequence, "updated": p.epochs * p.batch_size * sequence}


def _perf(tokens: dict[str, int], rollout_s: float, score_s: float,
          update_s: float) -> dict[str, float]:
  """Seconds per phase and tokens/s (prompt + response slots, padding included).

  perf/tokens_per_s is the whole iteration's throughput over the episodes' token
  slots; the per-phase rates count what each phase processes (the update makes
  `epochs` passes over the batch).
  """
  total = rollout_s + score_s + update_s
  return {"perf/rollout_s": rollout_s, "perf/score_s": score_s, "perf/update_s": update_s,
          "perf/iteration_s": total,
          "perf/tokens_per_s": tokens["scored"] / max(total, 1e-9),
          "perf/rollout_tokens_per_s": tokens["sampled"] / max(rollout_s, 1e-9),
          "perf/score_tokens_per_s": tokens["scored"] / max(score_s, 1e-9),
          "perf/update_tokens_per_s": tokens["updated"] / max(update_s, 1e-9)}


def _check_finite(host: dict[str, float], iteration: int, last_saved: Optional[int],
                  workdir: str) -> None:
  bad = [k for k in _MUST_BE_FINITE if k in host and not math.isfinite(host[k])]
  if not bad:
    return
  kept = (f"the last good checkpoint is iteration {last_saved} in "
          f"{os.path.join(workdir, checkpoint.CHECKPOINT_DIR)}" if last_saved
          else "no checkpoint was written")
  raise optim.NonFiniteError(
      f"iteration {iteration}: {', '.join(bad)} not finite (NaN or inf); the run stopped "
      f"and {kept} (try a lower optim.learning_rate or a larger ppo.kl_coef)")


def _log_samples(workdir: str, iteration: int, tokenizer, host_batch, samples, n: int):
  """Appends the first `n` rollouts of this iteration, decoded, to samples.jsonl.

  Only when asked for (config.log.samples_per_iteration): fetching the tokens is a
  host sync. After a resume, re-run iterations append identical lines again.
  """
  from jax.experimental import multihost_utils
  tokens, mask = (multihost_utils.process_allgather(x, tiled=True) for x in (samples.tokens,
                                                                  samples.mask))
  if not common.is_main():
    return
  import json
  prompts = host_batch["prompt_tokens"][:n], host_batch["prompt_mask"][:n]
  with open(os.path.join(workdir, "samples.jsonl"), "a") as f:
    for prompt, prompt_mask, response, response_mask in zip(*prompts, tokens[:n], mask[:n]):
      text = lambda t, m: tokenizer.decode(
          [int(x) for x, keep in zip(t, m) if keep and x != tokenizer.eos_id]).strip()
      f.write(json.dumps({"step": iteration, "prompt": text(prompt, prompt_mask),
                          "response": text(response, response_mask)}) + "\n")
