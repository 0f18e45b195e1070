"""`rlhf_jax.plan`: ahead-of-time memory and FLOPs of a config's steps.

Tiny SFT and RM configs are planned in-process on conftest's 8 CPU devices (a
2x2x2 mesh); the command line is checked for its one-line errors.
"""
import pathlib
import subprocess
import sys

import pytest

from rlhf_jax import config_base, plan
from rlhf_jax.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(stage: str):
  c = config_base.base_config()
  c.stage = stage
  c.data.format = "tldr"  # SFT trains on the preferred summary, the RM on the pair
  c.model.vocab_size = 128
  c.model.d_model = 32
  c.model.n_layers = 2
  c.model.n_heads = 2
  c.model.n_kv_heads = 2
  c.model.d_ff = 64
  c.model.max_len = 32
  c.data.prompt_len = 24
  c.data.response_len = 8
  c.data.batch_size = 8
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
  c.lock()
  return c


@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_plan_reports_memory_and_flops(stage):
  result = plan.plan(tiny_config(stage), num_devices=8, chip="v5e")
  assert result["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
  (step,) = result["functions"]
  assert step["name"] == f"{stage}/train_step"
  for key in ("argument", "output", "temp", "peak"):
    assert step[key] > 0, key
  # The state is donated: its output buffers alias its argument buffers.
  assert 0 < step["alias"] <= step["argument"]
  # Unrolled layers have no loops: XLA's count is close to 6 x params x tokens
  # (attention, norms, the embedding lookup and the RM's last layer, which runs
  # only at the EOS, make up the difference).
  assert step["xla_flops"] > 0
  assert 1 / 3 < step["xla_flops"] / step["analytic_flops"] < 3
  assert result["fits"] and step["peak"] < 64 * 2 ** 20
  text = plan.format_plan(result)
  assert f"{stage}/train_step" in text and "fits in v5e" in text


def test_mesh_that_does_not_divide_the_devices_is_an_error():
  config = tiny_config("sft")
  with config.unlocked():
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 3, -1, 1
  with pytest.raises(ConfigError, match=r"config\.mesh: .*does not divide the 8"):
    plan.plan(config, num_devices=8)


def test_unknown_chip_is_an_error():
  with pytest.raises(ConfigError, match="--chip: 'tpu9'"):
    plan.plan(tiny_config("sft"), num_devices=8, chip="tpu9")


def test_command_line_error_is_one_line():
  """--num_devices sets the CPU device count before jax starts: 4 x 1 x 1 on 6 fails."""
  result = subprocess.run(
      [sys.executable, "-m", "rlhf_jax.plan", "--config", "configs/tldr_gpt2.py:sft",
       "--num_devices", "6", "--config.mesh.data=4", "--config.mesh.fsdp=1"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1, result.stderr[-2000:]
  lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
  assert lines == ["error: config.mesh: data=4 x fsdp=1 x tensor=1 uses 4 devices but 6 "
                   "are available"], result.stderr[-2000:]
  assert result.stdout == ""
