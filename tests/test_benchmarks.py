"""The benchmark scripts run end to end and report the fields BENCHMARKS.md needs.

Nothing here asserts a speed (DESIGN.md section 8: benchmarks live in benchmarks/,
never as timed assertions). The scripts run as a user runs them, as subprocesses
on one CPU device with tiny shapes; they are started together because each is
mostly single-threaded XLA compilation. The TRL half of the PPO comparison runs
only where trl is importable.
"""
import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
HAS_TRL = importlib.util.find_spec("trl") is not None
TINY_MODEL = ["--n_layers=2", "--d_model=64", "--n_heads=2", "--vocab=512"]
TINY_WORK = ["--rm_pairs=2", "--rm_prompt_len=8", "--rm_response_len=8", "--batch=4",
             "--prompt_len=8", "--new_tokens=8", "--epochs=1"]
TIMEOUT_S = 300


def _env() -> dict:
  """One CPU device (not conftest's eight), and XLA's cheapest CPU code
  generation: the runs are nearly all compilation, and no speed is checked."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", TRL_EXPERIMENTAL_SILENCE="1")
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags + ["--xla_backend_optimization_level=0",
                                       "--xla_llvm_disable_expensive_passes=true"])
  return env


def _start(script: str, args: list[str]) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / script)] + args,
                          cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, json_path: pathlib.Path) -> tuple[str, dict]:
  try:
    out, err = proc.communicate(timeout=TIMEOUT_S)
  except subprocess.TimeoutExpired:
    proc.kill()
    out, err = proc.communicate()
    pytest.fail(f"{proc.args} ran past {TIMEOUT_S} s:\n{err[-3000:]}")
  assert proc.returncode == 0, f"{proc.args} failed:\n{err[-3000:]}"
  return out, json.loads(json_path.read_text())


def _check_mfu(out: str, report: dict) -> None:
  assert "MFU" in out and "roofline" in out
  rows = {row["phase"]: row for row in report["rows"]}
  assert set(rows) == {"sft", "rm", "rollout", "decode", "score", "update"}
  for phase, row in rows.items():
    assert row["size"] == "tiny" and row["params"] > 0
    if phase != "decode":  # decode is a difference of two timings: nan when noise wins
      assert row["tokens_per_s"] > 0 and row["step_s"] > 0
      assert 0 < row["mfu"] < float("inf")
  decode = rows["decode"]
  assert decode["bytes_per_step"] > 0 and "gb_per_s" in decode
  assert decode["roofline"] > 0 or math.isnan(decode["roofline"])
  for key in ("date", "command", "versions", "devices", "peak"):
    assert report[key]
  assert report["peak_bytes_per_s"] == 10e9  # --peak_gbps 10


def _check_compare(out: str, report: dict) -> None:
  assert "rlhf_jax / pytorch speed" in out
  for key in ("date", "command", "hardware", "versions", "results"):
    assert report[key]
  assert "--only" in report["command"] and report["hardware"]["summary"]
  assert report["versions"]["jax"]
  sample = report["results"]["sample"]
  assert set(sample["impls"]) == {"rlhf_jax", "hf_generate"}
  for impl in sample["impls"].values():
    assert impl["median_s"] > 0 and impl["per_s"] > 0 and len(impl["wall_s"]) == 1
  assert sample["ratio"] > 0 and sample["ratio_cpu"] > 0 and sample["goal_cpu_2core"] == 3.0
  if HAS_TRL:
    ppo = report["results"]["ppo"]
    assert set(ppo["impls"]) == {"rlhf_jax", "trl"}
    assert set(ppo["phase_ratios"]) == {"rollout", "score", "update"}
    assert all(s > 0 for s in ppo["impls"]["trl"]["phases_median_s"].values())
    assert report["versions_trl_worker"]["trl"] == "1.12.0"


def test_mfu_and_compare_report_their_fields(tmp_path):
  pytest.importorskip("transformers")
  mfu_json, compare_json = tmp_path / "mfu.json", tmp_path / "compare.json"
  mfu = _start("mfu.py", ["--sizes=tiny", "--repeats=1", "--peak_gbps=10",
                          f"--json={mfu_json}"])
  only = ["--only=sample"] + (["--only=ppo"] if HAS_TRL else [])
  compare = _start("compare.py", only + ["--warmup=1", "--repeats=1", f"--json={compare_json}"]
                   + TINY_MODEL + TINY_WORK)
  compare_result = _finish(compare, compare_json)
  _check_mfu(*_finish(mfu, mfu_json))
  _check_compare(*compare_result)
