"""Where a run's numbers go: metrics.jsonl, TensorBoard, a progress bar, summary.json.

  MetricsWriter   one JSON object per logged step in WORKDIR/metrics.jsonl (process 0),
                  the same scalars as TensorBoard events; on resume it drops what was
                  written after the restored checkpoint, so no step appears twice
  MetricsBuffer   per-step device metrics since the last log step, averaged when
                  logged; its host copy goes into checkpoints for exact resume
  Progress        a tqdm bar with ETA (off when stderr is not a terminal)
  write_summary   summary.json, written atomically at the end of a run

Keys are slash-named by kind: 'loss/rm', 'rm/accuracy', 'optim/grad_norm',
'perf/tokens_per_s', and 'eval/...' for held-out metrics.
"""
from __future__ import annotations

import json
import math
import sys
import time
from typing import Any, Iterable

import jax
import numpy as np
from absl import logging
from etils import epath

from rlhf_jax import checkpoint

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
TENSORBOARD_DIR = "tensorboard"


def _is_main() -> bool:
  return jax.process_index() == 0


def _json_value(v: Any) -> Any:
  """Python floats for JSON; NaN/inf as strings (JSON has no literal for them)."""
  v = float(v) if np.ndim(v) == 0 and not isinstance(v, (str, bool, int)) else v
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)
  return v


def _complete_lines(path: epath.Path, keep_through_step: float) -> list[str]:
  """The complete JSON lines of `path` with step <= `keep_through_step`.

  A run killed mid-write may leave half a line; it is dropped.
  """
  if not path.exists():
    return []
  kept = []
  for line in path.read_text().splitlines():
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    if isinstance(record, dict) and record.get("step", math.inf) <= keep_through_step:
      kept.append(json.dumps(record) + "\n")
  return kept


def _replace(path: epath.Path, text: str) -> None:
  """Writes `text` to a temporary file beside `path`, then renames it over `path`:
  a crash never leaves `path` half-written (on local disks; on GCS the rename is a
  copy, still never a partial object)."""
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_text(text)
  tmp.replace(path)


def truncate_jsonl(path, keep_through_step: int) -> None:
  """Keeps only the complete lines with step <= `keep_through_step`."""
  path = epath.Path(path)
  if path.exists():
    _replace(path, "".join(_complete_lines(path, keep_through_step)))


def read_jsonl(path) -> list[dict]:
  return [json.loads(line) for line in epath.Path(path).read_text().splitlines()
          if line.strip()]


class MetricsWriter:
  """Appends logged steps to metrics.jsonl and TensorBoard; a no-op off process 0.

  `start_step` is the step the run starts from (the restored checkpoint's, or 0):
  lines after it belong to the lost part of an interrupted run and are removed,
  and TensorBoard is told to purge its events after it too. A local file is
  appended to (one write + flush per line: a kill leaves at most a partial last
  line, dropped on resume); object stores cannot append, so a remote (gs://) file
  is rewritten whole at each log step.
  """

  def __init__(self, workdir: str, *, start_step: int = 0, tensorboard: bool = True):
    self.enabled = _is_main()
    self.path = checkpoint.run_path(workdir, METRICS_FILE)
    self._tb = self._file = None
    if not self.enabled:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._lines = _complete_lines(self.path, start_step)
    _replace(self.path, "".join(self._lines))
    if "://" not in str(self.path):
      self._file = open(self.path, "a")
    if tensorboard:
      from tensorboardX import SummaryWriter  # heavy import; only when used
      self._tb = SummaryWriter(str(self.path.parent / TENSORBOARD_DIR),
                               purge_step=start_step + 1)

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step)}
    record.update({k: _json_value(v) for k, v in sorted(metrics.items())})
    line = json.dumps(record) + "\n"
    if self._file is not None:
      self._file.write(line)
      self._file.flush()
    else:
      self._lines.append(line)
      _replace(self.path, "".join(self._lines))
    if self._tb is not None:
      for key, value in record.items():
        if key != "step" and isinstance(value, (int, float)):
          self._tb.add_scalar(key, value, step)
      self._tb.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
    if self._tb is not None:
      self._tb.close()


class MetricsBuffer:
  """Train metrics of every step since the last log step, averaged at the log step.

  Steps add their metric dicts without waiting for the device; values are
  fetched only in `pop_mean` (log steps) and `host_state` (checkpoint steps).
  `host_state` / `from_host_state` carry an unfinished interval across a
  restart, so a resumed run logs exactly the means an uninterrupted run would.
  """

  def __init__(self, pending: Iterable[dict] = ()):
    self._pending = list(pending)

  def add(self, metrics: dict) -> None:
    self._pending.append(metrics)

  def __len__(self) -> int:
    return len(self._pending)

  def host_state(self) -> list[dict[str, float]]:
    self._pending = [{k: float(v) for k, v in m.items()}
                     for m in jax.device_get(self._pending)]
    return list(self._pending)

  @classmethod
  def from_host_state(cls, state: list[dict] | None) -> "MetricsBuffer":
    return cls(state or ())

  def pop_mean(self) -> dict[str, float]:
    """Mean of each metric over the buffered steps (in step order), then empties."""
    rows = self.host_state()
    self._pending = []
    if not rows:
      return {}
    return {k: float(np.mean([row[k] for row in rows], dtype=np.float64)) for k in rows[0]}


class Throughput:
  """Tokens/s and steps/s between log steps (wall clock; not part of exact resume)."""

  def __init__(self, tokens_per_step: int):
    self.tokens_per_step = tokens_per_step
    self.reset()

  def reset(self) -> None:
    self._start, self._steps = time.perf_counter(), 0

  def step(self) -> None:
    self._steps += 1

  def pop(self) -> dict[str, float]:
    elapsed = max(time.perf_counter() - self._start, 1e-9)
    out = {"perf/steps_per_s": self._steps / elapsed,
           "perf/tokens_per_s": self._steps * self.tokens_per_step / elapsed,
           "perf/step_time_s": elapsed / max(self._steps, 1)}
    self.reset()
    return out


class Progress:
  """A tqdm progress bar with ETA; absl log lines instead when it is off."""

  def __init__(self, total: int, initial: int, enabled: bool, desc: str):
    self.enabled = enabled and _is_main() and sys.stderr.isatty()
    self._bar = None
    if self.enabled:
      import tqdm
      self._bar = tqdm.tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
                            unit="step")
    self.total = total

  def update(self, step: int, metrics: dict[str, float] | None = None) -> None:
    if self._bar is not None:
      self._bar.update(step - self._bar.n)
      if metrics:
        self._bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in metrics.items()},
                              refresh=False)
    elif metrics and _is_main():
      shown = ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items()))
      logging.info("step %d/%d: %s", step, self.total, shown)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


def write_summary(workdir: str, summary: dict) -> str:
  """summary.json (process 0), atomically: readers never see half a file."""
  path = checkpoint.run_path(workdir, SUMMARY_FILE)
  if _is_main():
    _replace(path, json.dumps(summary, indent=2, sort_keys=True, default=_json_value) + "\n")
  return str(path)
