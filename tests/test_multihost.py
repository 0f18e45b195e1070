"""Multi-host: 2 processes x 4 CPU devices train exactly like 1 process x 8 devices.

The runlocal pipeline (configs/demo.py:runlocal, stages sft then rm, shrunk to a
2-layer d_model 32 model, a small synthetic task and two steps per stage) runs
three processes at once: one with 8 CPU devices, and two with 4 devices each that
find each other through `--coordinator_address=127.0.0.1:PORT --num_processes=2
--process_id=i` (jax.distributed, gloo collectives on CPU). Each of the two
reads its own half of every global batch, so the logged losses agree only if the
data sharding, the cross-process collectives, the task files and tokenizer that
process 0 writes for both, checkpointing, the RM's comparisons sampled from the
SFT policy across both processes, and the RM's start from the SFT checkpoint all
work across processes.
"""
import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT_S = 900  # the CPU is shared; a hung coordinator must not hang the suite


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _command(workdir: pathlib.Path) -> list[str]:
  return [
      sys.executable, "-m", "rlhf_jax.train", "--config", "configs/demo.py:runlocal",
      "--workdir", str(workdir), "--config.pipeline.stages=sft,rm",
      "--config.pipeline.task_train=64", "--config.pipeline.task_eval=16",
      "--config.pipeline.comparison_prompts=48", "--config.pipeline.eval_batch_size=16",
      "--config.pipeline.sft.steps=2", "--config.pipeline.sft.batch_size=16",
      "--config.pipeline.rm.steps=2", "--config.pipeline.rm.batch_size=16",
      "--config.model.d_model=32", "--config.model.n_layers=2", "--config.model.n_heads=2",
      "--config.model.n_kv_heads=2", "--config.model.d_ff=64",
      f"--config.data.cache_dir={workdir / 'data_cache'}",
      # Normalisation is one more compile per process, and no loss depends on it.
      "--config.rm.normalize=False",
      "--config.log.every_steps=1", "--config.log.tensorboard=False",
      "--config.log.progress_bar=False", "--config.checkpoint.async_save=False",
  ]


def _start(command: list[str], devices: int, log: pathlib.Path) -> subprocess.Popen:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  with open(log, "w") as out:
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=out,
                            stderr=subprocess.STDOUT)


def _losses(workdir: pathlib.Path, stage: str) -> list[float]:
  with open(workdir / stage / "metrics.jsonl") as f:
    return [json.loads(line)[f"loss/{stage}"] for line in f]


def test_two_processes_match_one(tmp_path):
  single, multi = tmp_path / "one_process", tmp_path / "two_processes"
  address = f"127.0.0.1:{_free_port()}"
  logs = [tmp_path / name for name in ("single.log", "multi0.log", "multi1.log")]
  # All three at once: each is mostly single-threaded compilation.
  runs = {"1 process x 8 devices": _start(_command(single), 8, logs[0])}
  for i in range(2):
    runs[f"process {i} of 2 x 4 devices"] = _start(
        _command(multi) + [f"--coordinator_address={address}", "--num_processes=2",
                           f"--process_id={i}"], 4, logs[i + 1])
  try:
    codes = {name: p.wait(timeout=TIMEOUT_S) for name, p in runs.items()}
  finally:
    for p in runs.values():
      if p.poll() is None:
        p.kill()
  failed = [f"--- {name} (exit {code})\n{log.read_text()[-3000:]}"
            for (name, code), log in zip(codes.items(), logs) if code != 0]
  assert not failed, "\n".join(failed)

  # The RM's comparisons were sampled from the SFT policy by all 8 devices.
  assert ((single / "comparisons" / "train.jsonl").read_text()
          == (multi / "comparisons" / "train.jsonl").read_text())
  for stage in ("sft", "rm"):
    one, two = _losses(single, stage), _losses(multi, stage)
    # Process 0 alone writes metrics: one line per step, not one per process.
    assert len(one) == len(two) == 2, (stage, one, two)
    assert two == pytest.approx(one, rel=1e-5, abs=1e-6), stage
