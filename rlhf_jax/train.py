"""The one entry point: `python -m rlhf_jax.train --config CFG --workdir DIR`.

Reads `config.stage` and runs that stage's trainer in DIR (or, for `pipeline`, every
stage in order, each in DIR/<stage>/). Re-running the same command resumes from the
last checkpoint. Mistakes a user can fix (config, data, mesh) end with one line on
stderr and exit status 1; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

from rlhf_jax import host_memory

# Before jax, numpy or absl start a thread: see host_memory.py.
host_memory.configure_for_this_host()

import os  # noqa: E402
import sys  # noqa: E402

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from rlhf_jax.errors import UserError  # noqa: E402
from rlhf_jax.trainers import run_stage  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/rm_hh.py:runlocal", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for this run's outputs.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for explicit multi-process runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")

def initialize_distributed() -> None:
  """Joins a multi-process run when asked to, or when a TPU VM / SLURM says so."""
  import jax
  if _COORDINATOR.value or _NUM_PROCESSES.value:
    if None in (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value):
      raise UserError("--coordinator_address, --num_processes and --process_id must "
                      "be given together")
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  elif os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("SLURM_JOB_ID"):
    jax.distributed.initialize()  # auto-detects the cluster


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    config = _CONFIG.value
    if config is not None:
      config.get("stage")  # forces the deferred load of the config file
  except OSError as e:  # ml_collections defers config-file load errors to here
    print(f"error: --config: {str(e).splitlines()[0]}: {str(e).splitlines()[-1].strip()}",
          file=sys.stderr)
    sys.exit(1)
  if config is None or not _WORKDIR.value:
    print("error: --config and --workdir are required", file=sys.stderr)
    sys.exit(2)
  try:
    initialize_distributed()
    run_stage(config, _WORKDIR.value)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


def parse_flags(argv):
  """absl flag parsing, with config-override mistakes reported as one line.

  A mistyped override (`--config.optim.learning_rat=...`) or a config file that
  fails to load surfaces from ml_collections as a deep traceback; the user only
  needs the message (which includes "Did you mean ...").
  """
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except (AttributeError, KeyError, TypeError, ValueError, ImportError, OSError) as e:
    message = str(e).replace("\\n", " ").replace("\\'", "'").strip("'\"").lstrip("'")
    print(f"error: bad --config: {message}", file=sys.stderr)
    sys.exit(1)


def run() -> None:
  """Console script `rlhf-jax`."""
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
