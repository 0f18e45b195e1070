"""Exact resume: a run stopped (or killed with SIGKILL) and re-run gives exactly the
metrics and params of an uninterrupted run. Also: non-finite losses stop a run
with one clear message, and SFT -> RM hand-over through `load_stage_params`.
"""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache

from rlhf_jax import checkpoint, metrics, optim, sharding
from rlhf_jax.trainers import common, supervised
from tests import supervised_run_fixtures as runs

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURE_CONFIG = ROOT / "tests" / "supervised_run_fixtures.py"


def _metrics(workdir) -> list[dict]:
  """metrics.jsonl without the wall-clock throughput (not part of exact resume)."""
  rows = metrics.read_jsonl(os.path.join(workdir, metrics.METRICS_FILE))
  return [{k: v for k, v in row.items() if not k.startswith("perf/")} for row in rows]


def _final_params(workdir):
  mesh = sharding.make_mesh(runs.run_config().mesh)
  return common.load_stage_params(str(workdir), mesh)[1]


_CACHE_OPTIONS = {"jax_persistent_cache_min_compile_time_secs": 0,
                  "jax_persistent_cache_min_entry_size_bytes": 0}


@pytest.fixture(scope="module", autouse=True)
def compile_once(tmp_path_factory):
  """A persistent compilation cache for this module: its eight runs (in-process
  and CLI subprocesses) compile the same few functions, so each compiles once.
  The cached executable is the compiled one, so results are unchanged."""
  path = str(tmp_path_factory.mktemp("jax_cache"))
  saved = {k: getattr(jax.config, k) for k in _CACHE_OPTIONS}
  compilation_cache.reset_cache()
  for k, v in _CACHE_OPTIONS.items():
    jax.config.update(k, v)
  compilation_cache.set_cache_dir(path)
  yield {"JAX_COMPILATION_CACHE_DIR": path,
         **{k.upper(): str(v) for k, v in _CACHE_OPTIONS.items()}}
  compilation_cache.reset_cache()
  jax.config.update("jax_compilation_cache_dir", None)
  for k, v in saved.items():
    jax.config.update(k, v)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("supervised")
  return runs.write_data(str(root / "data")), str(root / "cache")


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
  """The uninterrupted RM run every resumed run must reproduce."""
  paths, cache = data
  workdir = tmp_path_factory.mktemp("reference")
  summary = supervised.train_rm(runs.set_files(runs.run_config(), paths, cache), str(workdir))
  return workdir, summary


def test_reference_run_writes_everything(reference):
  workdir, summary = reference
  rows = _metrics(workdir)
  assert [r["step"] for r in rows] == [2, 4, 6, 8, 10, 12]
  assert {"loss/rm", "rm/accuracy", "optim/grad_norm", "eval/rm/accuracy"} <= set(rows[1])
  assert "perf/tokens_per_s" in metrics.read_jsonl(workdir / "metrics.jsonl")[0]
  assert 0.0 <= summary["rm"]["val_accuracy"] <= 1.0
  assert summary == json.loads((workdir / "summary.json").read_text())
  assert sorted(os.listdir(workdir / "checkpoints")) == ["12", "9"]  # keep = 2
  assert os.listdir(workdir / "tensorboard")
  config = json.loads((workdir / "config.json").read_text())
  assert config["model"]["vocab_size"] == summary["model"]["vocab_size"] <= 300


def test_stopped_and_resumed_run_equals_uninterrupted(reference, data, tmp_path):
  paths, cache = data
  config = runs.set_files(runs.run_config(), paths, cache)
  assert supervised.train_rm(config, str(tmp_path), stop_at_step=5) is None
  assert _metrics(tmp_path)[-1]["step"] == 4  # step 5 is half of a log interval
  # An unfinished run's params load from its latest checkpoint.
  assert not checkpoint.has_params(str(tmp_path))
  partial = _final_params(tmp_path)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(partial))
  summary = supervised.train_rm(config, str(tmp_path))
  assert _metrics(tmp_path) == _metrics(reference[0])
  assert summary["rm"] == reference[1]["rm"]
  chex_equal = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)),
                            _final_params(tmp_path), _final_params(reference[0]))
  assert all(jax.tree.leaves(chex_equal))
  # Re-running a finished run changes nothing and duplicates no step.
  supervised.train_rm(config, str(tmp_path))
  assert _metrics(tmp_path) == _metrics(reference[0])


def _cli(workdir, paths, cache, env):
  args = [sys.executable, "-m", "rlhf_jax.train", f"--config={FIXTURE_CONFIG}",
          f"--workdir={workdir}", f"--config.data.train_files={paths['comparisons_train']}",
          f"--config.data.eval_files={paths['comparisons_eval']}",
          f"--config.data.cache_dir={cache}", "--config.checkpoint.every_steps=1"]
  return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=dict(os.environ, **env))


def test_kill_9_mid_run_then_resume_equals_uninterrupted(reference, data, tmp_path,
                                                        compile_once):
  paths, cache = data
  workdir = tmp_path / "run"
  process = _cli(workdir, paths, cache, compile_once)
  checkpoints = workdir / "checkpoints"
  deadline = time.time() + 240
  while time.time() < deadline and process.poll() is None:
    if checkpoints.exists() and any(p.isdigit() and int(p) >= 2 for p in os.listdir(checkpoints)):
      break
    time.sleep(0.02)
  assert process.poll() is None, process.communicate()[1][-3000:]
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert not (workdir / "summary.json").exists()  # really killed mid-run
  resumed = _cli(workdir, paths, cache, compile_once)
  _, stderr = resumed.communicate(timeout=300)
  assert resumed.returncode == 0, stderr[-3000:]
  assert "resuming from step" in stderr
  assert _metrics(workdir) == _metrics(reference[0])


class _PoisonedIterator:
  """The real training iterator, but from batch `bad` on every weight is NaN: the
  loss of that step is NaN, like a numerical blow-up, with the same compiled step."""

  def __init__(self, inner, bad: int):
    self._inner, self._bad, self._n = inner, bad, 0

  def __getattr__(self, name):
    return getattr(self._inner, name)

  def __next__(self):
    batch = next(self._inner)
    self._n += 1
    if self._n >= self._bad:
      batch = dict(batch, weight=np.full_like(batch["weight"], np.nan))
    return batch


def test_non_finite_loss_stops_with_one_message(data, tmp_path, monkeypatch):
  paths, cache = data
  make_train_iterator = supervised.pipeline.make_train_iterator
  monkeypatch.setattr(supervised.pipeline, "make_train_iterator",
                      lambda *a, **k: _PoisonedIterator(make_train_iterator(*a, **k), 5))
  config = runs.set_files(runs.run_config(), paths, cache)
  with pytest.raises(optim.NonFiniteError) as error:
    supervised.train_rm(config, str(tmp_path))
  # Found at the next log step (6); the checkpoint of step 3 is the last one.
  assert str(error.value).startswith("step 5: loss/rm is not finite (NaN or inf)")
  assert "the last good checkpoint is step 3" in str(error.value)
  assert checkpoint.Checkpointer(str(tmp_path), keep=2).all_steps() == [3]
  assert _metrics(tmp_path)[-1]["step"] == 4  # nothing logged from the bad steps


def test_sft_then_rm_from_sft_hands_over_model_and_tokenizer(data, tmp_path):
  """The RM starts from the SFT run's trunk, tokenizer and architecture, and its
  exported params (with the normalised bias) load for the next stage."""
  paths, cache = data
  sft_dir, rm_dir = tmp_path / "sft", tmp_path / "rm"
  sft_config = runs.set_files(runs.run_config("sft"), paths, cache, stage="sft")
  sft_config.sft.steps = 4
  summary = supervised.train_sft(sft_config, str(sft_dir))
  assert summary["sft"]["val_loss"] > 0
  rm_config = runs.set_files(runs.run_config(), paths, cache)
  rm_config.rm.init_checkpoint = str(sft_dir)
  rm_config.rm.normalize = True
  rm_config.rm.normalize_gain = True
  rm_config.model.d_model = 64  # ignored: the architecture is the SFT model's
  summary = supervised.train_rm(rm_config, str(rm_dir))
  assert (rm_dir / "tokenizer.model").read_bytes() == (sft_dir / "tokenizer.model").read_bytes()
  assert json.loads((rm_dir / "config.json").read_text())["model"]["d_model"] == 32
  norm = summary["rm"]["normalization"]
  mesh = sharding.make_mesh(rm_config.mesh)
  model_config, params, tokenizer = common.load_stage_params(str(rm_dir), mesh)
  assert model_config.d_model == 32 and tokenizer.vocab_size == model_config.vocab_size
  assert float(params["bias"]) == pytest.approx(norm["bias"])
  assert float(params["gain"]) == pytest.approx(norm["gain"])
  assert norm["std_before"] > 0 and norm["num_responses"] == 64
