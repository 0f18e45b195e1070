"""The SFT / RM stages through the command line (`python -m rlhf_jax.train`)."""
import gzip
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

from rlhf_jax import config_base

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_cli(*args, timeout=300):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  # One CPU device, as a user's laptop run (conftest forces eight for sharding
  # tests), and no LLVM optimisation: compiles twice as fast, and these tests
  # check behaviour, not speed.
  env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace(
      "--xla_force_host_platform_device_count=8", "") + " --xla_backend_optimization_level=0"
  return subprocess.run([sys.executable, "-m", "rlhf_jax.train", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout, env=env)


def test_missing_train_files_is_one_clear_line(tmp_path):
  result = run_cli("--config=configs/rm_hh.py:runlocal", f"--workdir={tmp_path / 'run'}")
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      "error: config.data.train_files: no files given")
  assert "Traceback" not in result.stderr


def test_rm_hh_runlocal_on_real_pairs_writes_val_accuracy(tmp_path, shared_data):
  """configs/rm_hh.py:runlocal end to end on real HH pairs (a small slice of them,
  so the test stays short): tokenizer trained, one epoch, eval, normalisation."""
  with gzip.open(shared_data / "hh-rlhf" / "harmless-base-test.jsonl.gz", "rt") as f:
    lines = [next(f) for _ in range(192)]
  train, evals = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
  train.write_text("".join(lines[:128]))
  evals.write_text("".join(lines[128:]))
  workdir = tmp_path / "run"
  result = run_cli("--config=configs/rm_hh.py:runlocal", f"--workdir={workdir}",
                   f"--config.data.train_files={train}", f"--config.data.eval_files={evals}",
                   f"--config.data.cache_dir={tmp_path / 'cache'}",
                   # One layer instead of two: half the compile time, same code path.
                   "--config.tokenizer.vocab_size=400", "--config.model.n_layers=1")
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["steps"] == 4  # one epoch of 128 pairs in batches of 32
  assert summary["rm"]["val_pairs"] == 64
  assert 0.0 <= summary["rm"]["val_accuracy"] <= 1.0
  assert abs(summary["rm"]["normalization"]["bias"]
             + summary["rm"]["normalization"]["mean_before"]) < 1e-6
  assert summary["data"]["train"]["truncated_prompts"] > 0  # long dialogues were cut
  for name in ("config.json", "tokenizer.model", "metrics.jsonl", "params", "checkpoints"):
    assert (workdir / name).exists(), name
  assert "rm done at step 4" in result.stdout


@pytest.mark.parametrize("name", ["rm_hh", "sft"])
@pytest.mark.parametrize("preset", [None, "runlocal"])
def test_configs_load_by_path_validate_and_are_locked(name, preset):
  spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)  # configs/ is not a package: loaded by path
  config = module.get_config(preset)
  config_base.validate(config)
  assert config.stage == {"rm_hh": "rm", "sft": "sft"}[name]
  assert "python -m rlhf_jax.train --config configs/" in module.__doc__
  with pytest.raises(AttributeError):
    config.optim.learning_rat = 1.0  # locked: a typo is an error
