"""The demo pipeline (`configs/demo.py:runlocal`) end to end through the CLI."""
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_runlocal_pipeline_writes_summary_and_report(tmp_path):
  workdir = tmp_path / "demo"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # one CPU device, as on a laptop
  result = subprocess.run(
      [sys.executable, "-m", "rlhf_jax.train", "--config", "configs/demo.py:runlocal",
       f"--workdir={workdir}", "--config.log.progress_bar=False",
       "--config.pipeline.sft.steps=10", "--config.pipeline.ppo.steps=2"],
      cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads((workdir / "summary.json").read_text())
  for section, key in [("sft", "gold_score"), ("rm", "val_accuracy"), ("ppo", "gold_score"),
                       ("ppo", "kl"), ("ppo", "win_rate_vs_sft"), ("reference", "gold_score")]:
    assert isinstance(summary[section][key], float), (section, key)
  assert 0.0 <= summary["ppo"]["win_rate_vs_sft"] <= 1.0
  # The references are decent summaries; a 10-step SFT model is not.
  assert summary["reference"]["gold_score"] > summary["sft"]["gold_score"]
  report = (workdir / "report.md").read_text()
  for png in ("ppo_curves.png", "gold_vs_kl.png", "rm_accuracy.png"):
    assert png in report and (workdir / png).stat().st_size > 10_000
  # Every stage finished and the PPO rollouts were logged for the gold plot.
  for stage in ("sft", "rm", "ppo"):
    assert (workdir / stage / "summary.json").exists()
  samples = (workdir / "ppo" / "samples.jsonl").read_text().splitlines()
  assert len(samples) == 2 * 32
