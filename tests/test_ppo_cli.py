"""The PPO stage end to end through the CLI, and exact resume after `kill -9`.

The SFT and RM runs PPO starts from are written directly in the layout their
trainer leaves (config.json, tokenizer.model, params/), with random tiny models:
training them would only add minutes. The PPO runs exercise every option at
once (PPO-ptx, EMA, best-of-N, a text judge, the alignment tax) on 2 CPU devices.

The three PPO processes share a persistent compilation cache, so only the first
one compiles; the others load the same executables (which also keeps their
results bit-identical).
"""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from rlhf_jax import checkpoint, config_base
from rlhf_jax.data import synthetic
from rlhf_jax.data.tokenizer import Tokenizer
from rlhf_jax.models import heads
from rlhf_jax.models.transformer import TransformerConfig
from tests.steps.ppo_fixtures import init_params

ROOT = pathlib.Path(__file__).resolve().parents[1]
ITERATIONS = 6


def write_stage_run(workdir: pathlib.Path, stage: str, tokenizer: Tokenizer, seed: int,
                    **model) -> None:
  """A finished SFT ('sft') or RM ('rm') run with random params, as the trainer
  would leave it: config.json, tokenizer.model and params/."""
  config = config_base.base_config()
  config.stage = stage
  config.model.update(model)
  config.model.vocab_size = tokenizer.vocab_size
  model_cls = heads.PolicyModel if stage == "sft" else heads.RewardModel
  params = init_params(model_cls(TransformerConfig.from_config(config.model)), seed, std=0.05)
  workdir.mkdir(parents=True)
  (workdir / "config.json").write_text(json.dumps(config.to_dict(), default=str))
  tokenizer.save(str(workdir / "tokenizer.model"))
  checkpoint.save_params(str(workdir), params)


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
  root = tmp_path_factory.mktemp("ppo_cli")
  files = synthetic.write_task_files(str(root / "task"), seed=0, n_train=48, n_eval=8)
  texts = [json.loads(line)["text"] for line in open(files["text_train"])]
  tokenizer = Tokenizer.train(texts, vocab_size=300, model_type="unigram")
  model = dict(family="gpt2", d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=32,
               max_len=64)
  write_stage_run(root / "sft", "sft", tokenizer, 0, **model)
  write_stage_run(root / "rm", "rm", tokenizer, 1, **model)
  return root, files


def ppo_command(root: pathlib.Path, files: dict, workdir: pathlib.Path) -> list[str]:
  return [
      sys.executable, "-m", "rlhf_jax.train", "--config", "configs/ppo.py:runlocal",
      f"--workdir={workdir}",
      f"--config.ppo.sft_checkpoint={root / 'sft'}",
      f"--config.ppo.rm_checkpoint={root / 'rm'}",
      f"--config.data.train_files={files['prompts_train']}",
      f"--config.data.eval_files={files['prompts_eval']}",
      f"--config.data.cache_dir={root / 'data_cache'}",
      "--config.data.truncate=True", "--config.data.prompt_len=40",
      "--config.data.response_len=8", "--config.data.text_len=24",
      "--config.data.eval_batch_size=8", "--config.model.max_len=64",
      "--config.rollout.new_tokens=8", f"--config.ppo.iterations={ITERATIONS}",
      "--config.ppo.batch_size=8", "--config.ppo.minibatches=2", "--config.ppo.epochs=2",
      "--config.ppo.eval_every_iterations=3", "--config.ppo.eval_batches=1",
      "--config.ppo.eval_best_of_n=2", "--config.ppo.gamma_ptx=0.5",
      f"--config.ppo.ptx_files={files['text_train']}",
      f"--config.ppo.ptx_eval_files={files['text_eval']}",
      "--config.ppo.ptx_batch_size=4", "--config.ppo.ema_decay=0.9",
      "--config.ppo.kl_horizon=100", "--config.ppo.value_head=reinit",
      "--config.checkpoint.every_steps=1", "--config.log.every_steps=2",
      "--config.log.progress_bar=False", "--config.log.tensorboard=False",
  ]


def ppo_env(cache_dir: pathlib.Path) -> dict:
  # LLVM optimisation level 0 halves XLA's CPU compile time, which dominates
  # these tiny runs; every run uses the same flags, so results stay comparable.
  return dict(os.environ, JAX_PLATFORMS="cpu",
              XLA_FLAGS="--xla_force_host_platform_device_count=2 "
                        "--xla_backend_optimization_level=0",
              JAX_COMPILATION_CACHE_DIR=str(cache_dir),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")


def _without_perf(records: list[dict]) -> list[dict]:
  return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in records]


def _read_metrics(workdir: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in open(workdir / "metrics.jsonl")]


def test_kill_9_and_rerun_ends_with_the_uninterrupted_summary(stages):
  root, files = stages
  env = ppo_env(root / "jax_cache")

  # 1. Uninterrupted.
  clean = root / "clean"
  result = subprocess.run(ppo_command(root, files, clean), cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads((clean / "summary.json").read_text())
  for key in ("score", "kl", "sft_score", "reference_score", "win_rate_vs_sft",
              "win_rate_vs_reference", "best_of_n_score", "win_rate_vs_best_of_n",
              "judge_score", "sft_judge_score", "ptx_loss", "alignment_tax"):
    assert key in summary["ppo"], key
  assert summary["kl_controller"]["kind"] == "adaptive"
  assert summary["kl_controller"]["value"] != 0.05  # beta moved
  records = _read_metrics(clean)
  assert [r["step"] for r in records] == [2, 3, 4, 6]  # logs every 2, evals at 3 and 6
  for key in ("ppo/score", "ppo/non_score_reward", "ppo/kl", "ppo/entropy", "ppo/beta",
              "ppo/clipfrac", "ppo/approxkl", "loss/policy", "loss/value", "loss/ptx",
              "ppo/explained_variance", "ppo/response_length", "ppo/no_eos_fraction",
              "perf/rollout_s", "perf/score_s", "perf/update_s", "perf/tokens_per_s"):
    assert key in records[0], key

  # 2. The same command, killed with SIGKILL once its second checkpoint exists ...
  killed = root / "killed"
  proc = subprocess.Popen(ppo_command(root, files, killed), cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpt_dir = killed / "checkpoints"
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    if ckpt_dir.exists() and any(p.name.startswith("2") for p in ckpt_dir.iterdir()):
      break
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (killed / "summary.json").exists(), "the run ended before it was killed"
  saved = sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())
  assert saved and saved[-1] < ITERATIONS

  # 3. ... and re-run: it resumes and ends exactly where the clean run ended.
  result = subprocess.run(ppo_command(root, files, killed), cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert json.loads((killed / "summary.json").read_text()) == summary
  assert _without_perf(_read_metrics(killed)) == _without_perf(records)


def test_missing_sft_checkpoint_is_one_clear_line(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "rlhf_jax.train", "--config", "configs/ppo.py:runlocal",
       f"--workdir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True,
      timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      "error: config.ppo.sft_checkpoint: give the workdir of a finished SFT run")
  assert "Traceback" not in result.stderr
