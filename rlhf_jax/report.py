"""The demo's report: report.md with PNG plots, from the files a pipeline wrote.

  ppo_curves.png     RM score, KL and beta over PPO iterations
  gold_vs_kl.png     gold score and RM score of the PPO samples as KL grows: where
                     the two part ways, the policy is over-optimising the RM
  rm_accuracy.png    RM accuracy next to the ceiling the label noise allows
"""
from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from rlhf_jax.data import synthetic  # noqa: E402


def _read_jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def headline(summary: dict) -> str:
  s = summary
  return (f"gold score: reference {s['reference']['gold_score']:.3f}, "
          f"SFT {s['sft']['gold_score']:.3f}, PPO {s['ppo']['gold_score']:.3f} "
          f"(win rate vs SFT {s['ppo']['win_rate_vs_sft']:.2f}) at KL "
          f"{s['ppo']['kl']:.2f} nats; RM val accuracy {s['rm']['val_accuracy']:.3f} "
          f"(noise ceiling {s['rm']['noise_ceiling']:.3f})")


def gold_by_iteration(samples: list[dict]) -> dict[int, float]:
  """Mean gold score of the logged PPO rollout samples, per iteration."""
  by_step: dict[int, list[float]] = {}
  for s in samples:
    by_step.setdefault(int(s["step"]), []).append(
        synthetic.gold_score(s["prompt"], s["response"]))
  return {step: float(np.mean(v)) for step, v in sorted(by_step.items())}


def plot_ppo_curves(rows: list[dict], path: str) -> None:
  rows = [r for r in rows if "ppo/score" in r]
  steps = [r["step"] for r in rows]
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
  for ax, key, label in zip(axes, ("ppo/score", "ppo/kl", "ppo/beta"),
                            ("RM score (mean per response)", "KL from SFT (nats / response)",
                             "KL coefficient beta")):
    ax.plot(steps, [r.get(key, np.nan) for r in rows], marker=".")
    ax.set_xlabel("PPO iteration")
    ax.set_title(label)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_gold_vs_kl(rows: list[dict], gold: dict[int, float], path: str) -> None:
  by_step = {r["step"]: r for r in rows if "ppo/kl" in r}
  steps = [s for s in gold if s in by_step]
  kl = np.array([by_step[s]["ppo/kl"] for s in steps])
  order = np.argsort(kl)
  fig, ax = plt.subplots(figsize=(6.5, 4))
  ax.plot(kl[order], np.array([gold[s] for s in steps])[order], marker="o",
          label="gold score (hidden labeler)")
  ax.plot(kl[order], np.array([by_step[s]["ppo/score"] for s in steps])[order], marker="s",
          label="RM score (what PPO optimises)")
  ax.set_xlabel("KL(policy || SFT), nats per response")
  ax.set_ylabel("mean score of the iteration's samples")
  ax.set_title("Gold vs reward-model score as KL grows")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_rm_accuracy(summary: dict, path: str) -> None:
  rm = summary["rm"]
  names = ["RM accuracy\n(held-out noisy labels)", "label agreement\nwith gold",
           "noise ceiling\n(best possible)"]
  values = [rm["val_accuracy"], rm["label_agreement"], rm["noise_ceiling"]]
  fig, ax = plt.subplots(figsize=(6.5, 4))
  bars = ax.bar(names, values, color=["tab:blue", "tab:gray", "tab:green"])
  for bar, v in zip(bars, values):
    ax.text(bar.get_x() + bar.get_width() / 2, v + 0.01, f"{v:.3f}", ha="center")
  ax.axhline(0.5, color="black", linestyle=":", label="chance")
  ax.set_ylim(0, 1)
  ax.set_ylabel("accuracy on held-out comparisons")
  ax.set_title("Reward model vs the label-noise ceiling")
  ax.legend(loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_report(workdir: str, summary: dict, samples: list[dict], n_samples: int = 4) -> str:
  rows = _read_jsonl(os.path.join(workdir, "ppo", "metrics.jsonl"))
  gold = gold_by_iteration(_read_jsonl(os.path.join(workdir, "ppo", "samples.jsonl")))
  plot_ppo_curves(rows, os.path.join(workdir, "ppo_curves.png"))
  plot_rm_accuracy(summary, os.path.join(workdir, "rm_accuracy.png"))
  lines = ["# rlhf_jax demo report", "", headline(summary), "",
           "| | gold score |", "|---|---|",
           f"| reference summaries | {summary['reference']['gold_score']:.3f} |",
           f"| SFT policy | {summary['sft']['gold_score']:.3f} |",
           f"| PPO policy | {summary['ppo']['gold_score']:.3f} |", "",
           f"PPO vs SFT win rate (gold judge): {summary['ppo']['win_rate_vs_sft']:.3f}; "
           f"PPO vs reference: {summary['ppo']['win_rate_vs_reference']:.3f}; "
           f"KL(PPO || SFT) = {summary['ppo']['kl']:.3f} nats per response, over "
           f"{summary['eval_prompts']} held-out prompts.", "",
           "## PPO over iterations", "", "![PPO curves](ppo_curves.png)", ""]
  if gold:
    plot_gold_vs_kl(rows, gold, os.path.join(workdir, "gold_vs_kl.png"))
    lines += ["## Gold score against the RM's score as KL grows", "",
              "Each point is one PPO iteration's rollouts. PPO only sees the reward "
              "model; the gold labeler is hidden. Where the RM score keeps rising but "
              "the gold score stalls or falls, the policy is exploiting the RM's "
              "errors (reward over-optimisation).", "", "![gold vs KL](gold_vs_kl.png)", ""]
  lines += ["## Reward model", "",
            "The RM learns from noisy rankings of SFT samples (each ranking gives "
            "its pairs). On the "
            f"{summary['rm']['pairs']} held-out pairs, the noisy labels agree with the gold labeler "
            f"{summary['rm']['label_agreement']:.1%} of the time, so no RM can exceed "
            f"about {summary['rm']['noise_ceiling']:.1%} accuracy on held-out noisy labels.",
            "", "![RM accuracy](rm_accuracy.png)", "",
            "## Samples before and after PPO", ""]
  for s in samples[:n_samples]:
    lines += [f"**Prompt:** {s['prompt']}", "",
              f"- reference: {s['reference']} (gold {synthetic.gold_score(s['prompt'], s['reference']):.2f})",
              f"- SFT: {s['sft']} (gold {s['gold_sft']:.2f})",
              f"- PPO: {s['ppo']} (gold {s['gold_ppo']:.2f})", ""]
  path = os.path.join(workdir, "report.md")
  with open(path + ".tmp", "w") as f:
    f.write("\n".join(lines))
  os.replace(path + ".tmp", path)
  return path
