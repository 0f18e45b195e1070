"""The command-line contract: one clear error line and a non-zero exit."""
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_cli(*args, timeout=300):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "rlhf_jax.train", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture
def config_file(tmp_path):
  path = tmp_path / "cfg.py"
  path.write_text(
      "from rlhf_jax import config_base\n"
      "def get_config(arg=None):\n"
      "  c = config_base.base_config()\n"
      "  c.lock()\n"
      "  return c\n")
  return path


def test_unknown_stage_is_one_clear_line(config_file, tmp_path):
  result = run_cli(f"--config={config_file}", f"--workdir={tmp_path / 'run'}",
                   "--config.stage=dpo")
  assert result.returncode == 1
  assert result.stderr.strip() == (
      "error: config.stage: 'dpo' is not one of ('sft', 'rm', 'ppo', 'pipeline')")


def test_bad_value_names_the_field(config_file, tmp_path):
  result = run_cli(f"--config={config_file}", f"--workdir={tmp_path / 'run'}",
                   "--config.data.on_bad_record=ignore")
  assert result.returncode == 1
  assert "config.data.on_bad_record: 'ignore' is not 'error' or 'skip'" in result.stderr
  assert "Traceback" not in result.stderr


def test_mistyped_override_is_rejected(config_file, tmp_path):
  result = run_cli(f"--config={config_file}", f"--workdir={tmp_path / 'run'}",
                   "--config.optim.learning_rat=1e-3")
  assert result.returncode != 0
  assert "learning_rat" in result.stderr
  assert "Traceback" not in result.stderr


def test_missing_workdir_is_a_usage_error(config_file):
  result = run_cli(f"--config={config_file}")
  assert result.returncode == 2
  assert "--workdir" in result.stderr


def test_missing_config_file_is_one_line(tmp_path):
  result = run_cli(f"--config={tmp_path / 'nope.py'}", f"--workdir={tmp_path / 'run'}")
  assert result.returncode == 1
  assert "nope.py" in result.stderr and "Traceback" not in result.stderr
