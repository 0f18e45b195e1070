"""The bundled demo's task-specific steps around the generic pipeline.

The synthetic summarisation task (rlhf_jax/data/synthetic.py) comes with a gold
labeler that no model ever sees. This module

  * writes the task's files (demonstrations, prompts, text) into WORKDIR/task/;
  * after SFT, samples K summaries per prompt from the SFT policy and ranks them
    with the task's *noisy* labeler (agreeing with gold ~73% of the time, like
    human labelers) -- the rankings the reward model learns from;
  * after PPO, samples the SFT and PPO policies on held-out prompts and judges
    them with the gold labeler: gold score, win rates, KL from the SFT policy;
    then writes summary.json and report.md with plots (rlhf_jax/report.py).

Every file is written to a temporary name and renamed, so an interrupted demo
never leaves half a file behind, and a re-run skips what is already there.
"""
from __future__ import annotations

import itertools
import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from rlhf_jax import losses, sampling, sharding
from rlhf_jax.data import synthetic
from rlhf_jax.models import heads
from rlhf_jax.trainers import common

TASK_DIR, COMPARISONS_DIR = "task", "comparisons"


def _write_jsonl_atomically(path: str, records: Sequence[dict]) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    for record in records:
      f.write(json.dumps(record) + "\n")
  os.replace(tmp, path)


def _sync(name: str) -> None:
  """Waits for every process: files process 0 wrote are then there for all."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _global(host: np.ndarray, mesh) -> jax.Array:
  """The same whole batch on every process -> one array split over the batch axes.

  Unlike sharding.shard_batch (whose input is this process's share of the batch),
  every process holds all the prompts here and builds the shards of its devices.
  """
  return jax.make_array_from_callback(
      host.shape, sharding.batch_sharding(mesh, host.ndim), lambda index: host[index])


def _fetch(x: jax.Array) -> np.ndarray:
  """The whole array on every process (np.asarray cannot read other hosts' shards)."""
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def task_files(workdir: str) -> dict[str, tuple[str, str]]:
  """(train, eval) files of each stage."""
  task, comparisons = (os.path.join(workdir, d) for d in (TASK_DIR, COMPARISONS_DIR))
  return {
      "sft": (os.path.join(task, "demos_train.jsonl"), os.path.join(task, "demos_eval.jsonl")),
      "rm": (os.path.join(comparisons, "train.jsonl"), os.path.join(comparisons, "eval.jsonl")),
      "ppo": (os.path.join(task, "prompts_train.jsonl"),
              os.path.join(task, "prompts_eval.jsonl")),
  }


def write_task(config, workdir: str) -> None:
  """The synthetic task's files, once (the same seed always writes the same data)."""
  task_dir = os.path.join(workdir, TASK_DIR)
  if jax.process_index() == 0 and not os.path.exists(os.path.join(task_dir, "done")):
    p = config.pipeline
    synthetic.write_task_files(task_dir, seed=p.task_seed, n_train=p.task_train,
                               n_eval=p.task_eval)
    open(os.path.join(task_dir, "done"), "w").close()
  _sync("demo task files")


# --------------------------------------------------------------------------------
# Sampling from a finished stage
# --------------------------------------------------------------------------------


class StagePolicy:
  """A finished stage's policy, ready to sample and score text on the mesh."""

  def __init__(self, stage_dir: str, mesh):
    self.config, self.params, self.tokenizer = common.load_stage_params(
        stage_dir, mesh, heads.PolicyModel)
    self.model = heads.PolicyModel(self.config)
    self.mesh = mesh
    self._samplers = {}

  def sample(self, prompts: Sequence[str], *, prompt_len: int, new_tokens: int,
             temperature: float, seed: int, batch_size: int):
    """Returns (texts, prompt_tokens, prompt_mask, response_tokens, response_mask)."""
    key = (new_tokens, temperature)
    if key not in self._samplers:
      self._samplers[key] = sampling.make_sampler(self.model, sampling.SamplingParams(
          new_tokens=new_tokens, stop_token=self.tokenizer.eos_id,
          pad_token=self.tokenizer.pad_id, temperature=temperature))
    outputs = []
    for start in range(0, len(prompts), batch_size):
      chunk = list(prompts[start:start + batch_size])
      real = len(chunk)
      chunk += [chunk[-1]] * (batch_size - real)  # static shapes: pad the last batch
      tokens, mask, _ = self.tokenizer.pad_prompts(self.tokenizer.encode_batch(chunk),
                                                   prompt_len)
      with jax.set_mesh(self.mesh):
        out = self._samplers[key](self.params, _global(tokens, self.mesh),
                                  _global(mask, self.mesh), jax.random.key(seed + start))
      outputs.append((tokens[:real], mask[:real], _fetch(out.tokens)[:real],
                      _fetch(out.mask)[:real]))
    prompt_tokens, prompt_mask, response_tokens, response_mask = (
        np.concatenate(parts) for parts in zip(*outputs))
    texts = [self.decode(t, m) for t, m in zip(response_tokens, response_mask)]
    return texts, prompt_tokens, prompt_mask, response_tokens, response_mask

  def decode(self, tokens, mask) -> str:
    ids = [int(t) for t, m in zip(tokens, mask) if m and t != self.tokenizer.eos_id]
    return self.tokenizer.decode(ids).strip()

  def logprobs(self, prompt_tokens, prompt_mask, response_tokens, response_mask,
               temperature: float, batch_size: int) -> np.ndarray:
    """Per-token log-probs of given responses under this policy: [N, R]."""
    fn = jax.jit(lambda p, a, b, c, d: losses.logprobs_of(
        heads.response_logits(self.model, p, a, b, c, d), c, temperature) * d)
    parts = []
    for start in range(0, len(prompt_tokens), batch_size):
      sl = slice(start, start + batch_size)
      arrays = [prompt_tokens[sl], prompt_mask[sl], response_tokens[sl], response_mask[sl]]
      real = len(arrays[0])
      arrays = [np.concatenate([a, np.repeat(a[-1:], batch_size - real, 0)]) for a in arrays]
      with jax.set_mesh(self.mesh):
        parts.append(_fetch(fn(self.params, *(_global(a, self.mesh) for a in arrays)))[:real])
    return np.concatenate(parts)


def _sampling_batch(config, mesh) -> int:
  dp = sharding.data_parallel_size(mesh)
  return max(dp, (config.pipeline.eval_batch_size // dp) * dp)


# --------------------------------------------------------------------------------
# Comparisons of SFT samples, labelled with noise
# --------------------------------------------------------------------------------


def write_sampled_comparisons(config, workdir: str) -> None:
  """K SFT samples per prompt, ranked by the noisy labeler (rankings format).

  K is `pipeline.comparison_responses`: InstructGPT labels K = 4 to 9 responses
  per prompt, and a ranking of K gives K(K-1)/2 comparisons for one prompt.
  Repeated and empty samples are dropped (they carry no preference, and the data
  formats reject empty responses); prompts left with fewer than two are skipped.
  Every pair inside every ranking goes to gold.json with both gold scores, so the
  report can compare RM accuracy with what the label noise allows.
  """
  out_dir = os.path.join(workdir, COMPARISONS_DIR)
  if os.path.exists(os.path.join(out_dir, "gold.json")):
    return
  os.makedirs(out_dir, exist_ok=True)
  mesh = sharding.make_mesh(config.mesh)
  policy = StagePolicy(os.path.join(workdir, "sft"), mesh)
  files = task_files(workdir)
  p = config.pipeline
  rng = np.random.default_rng(p.task_seed + 1)
  gold = {}
  for split, path, limit in (("train", files["sft"][0], p.comparison_prompts),
                             ("eval", files["sft"][1], None)):
    prompts = [r["prompt"] for r in _read_jsonl(path)][:limit]
    texts = [policy.sample(prompts, prompt_len=config.data.prompt_len,
                           new_tokens=config.data.response_len - 1,
                           temperature=p.comparison_temperature,
                           seed=1000 * draw + (split == "eval"),
                           batch_size=_sampling_batch(config, mesh))[0]
             for draw in range(p.comparison_responses)]
    records, gold_pairs = [], []
    for prompt, *candidates in zip(prompts, *texts):
      responses = list(dict.fromkeys(t for t in candidates if t))  # distinct, in order
      if len(responses) < 2:
        continue
      ranks = synthetic.rank(rng, prompt, responses)
      records.append({"prompt": prompt, "responses": responses, "ranks": ranks})
      golds = [synthetic.gold_score(prompt, t) for t in responses]
      for i, j in itertools.combinations(range(len(responses)), 2):
        gold_pairs.append([golds[i], golds[j], 0 if ranks[i] < ranks[j] else 1])
    if jax.process_index() == 0:
      _write_jsonl_atomically(os.path.join(out_dir, f"{split}.jsonl"), records)
    gold[split] = gold_pairs
  if jax.process_index() == 0:
    with open(os.path.join(out_dir, "gold.json.tmp"), "w") as f:
      json.dump(gold, f)
    os.replace(os.path.join(out_dir, "gold.json.tmp"), os.path.join(out_dir, "gold.json"))
  _sync("demo comparisons")


def label_quality(gold_pairs: list) -> dict[str, float]:
  """How often the noisy labels agree with gold, and the best possible RM accuracy."""
  pairs = np.asarray(gold_pairs, np.float64).reshape(-1, 3)
  a, b, label = pairs[:, 0], pairs[:, 1], pairs[:, 2]
  differ = a != b
  gold_label = (b > a).astype(np.float64)  # 1: b is better
  return {
      "label_agreement": float(np.mean(label[differ] == gold_label[differ])),
      "noise_ceiling": float(synthetic.noise_ceiling(a, b)),
      "pairs": int(len(pairs)),
  }


# --------------------------------------------------------------------------------
# Gold-judged evaluation and the report
# --------------------------------------------------------------------------------


def win_rate(scores_a: np.ndarray, scores_b: np.ndarray) -> float:
  """Fraction of prompts where a beats b; ties count one half."""
  return float(np.mean((scores_a > scores_b) + 0.5 * (scores_a == scores_b)))


def evaluate_and_report(config, workdir: str) -> dict:
  """Gold evaluation of SFT vs PPO on held-out prompts; summary.json + report.md."""
  from rlhf_jax import metrics, report

  mesh = sharding.make_mesh(config.mesh)
  records = _read_jsonl(task_files(workdir)["ppo"][1])
  prompts = [r["prompt"] for r in records]
  references = [r["reference"] for r in records]
  sample_args = dict(prompt_len=config.data.prompt_len, new_tokens=config.rollout.new_tokens,
                     temperature=config.rollout.temperature,
                     batch_size=_sampling_batch(config, mesh))
  sft = StagePolicy(os.path.join(workdir, "sft"), mesh)
  ppo = StagePolicy(os.path.join(workdir, "ppo"), mesh)
  sft_texts, *_ = sft.sample(prompts, seed=7, **sample_args)
  ppo_texts, pt, pm, rt, rm = ppo.sample(prompts, seed=7, **sample_args)
  # KL(PPO || SFT) per response, estimated on the PPO policy's own samples.
  kl = (ppo.logprobs(pt, pm, rt, rm, config.rollout.temperature, sample_args["batch_size"])
        - sft.logprobs(pt, pm, rt, rm, config.rollout.temperature,
                       sample_args["batch_size"])).sum(-1)
  gold = {name: np.array([synthetic.gold_score(p, t) for p, t in zip(prompts, texts)])
          for name, texts in (("sft", sft_texts), ("ppo", ppo_texts),
                              ("reference", references))}
  with open(os.path.join(workdir, COMPARISONS_DIR, "gold.json")) as f:
    labels = label_quality(json.load(f)["eval"])
  with open(os.path.join(workdir, "rm", "summary.json")) as f:
    rm_summary = json.load(f)
  summary = {
      "sft": {"gold_score": float(gold["sft"].mean())},
      "rm": {"val_accuracy": rm_summary["rm"].get("val_accuracy"), **labels},
      "ppo": {"gold_score": float(gold["ppo"].mean()), "kl": float(kl.mean()),
              "win_rate_vs_sft": win_rate(gold["ppo"], gold["sft"]),
              "win_rate_vs_reference": win_rate(gold["ppo"], gold["reference"])},
      "reference": {"gold_score": float(gold["reference"].mean())},
      "eval_prompts": len(prompts),
  }
  samples = [dict(prompt=p, reference=r, sft=s, ppo=q, gold_sft=float(gs), gold_ppo=float(gp))
             for p, r, s, q, gs, gp in zip(prompts, references, sft_texts, ppo_texts,
                                          gold["sft"], gold["ppo"])]
  if jax.process_index() == 0:
    metrics.write_summary(workdir, summary)
    report.write_report(workdir, summary, samples)
    print(report.headline(summary), flush=True)
  return summary
