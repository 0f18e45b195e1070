#!/usr/bin/env bash
# Cloud TPU VM launcher for rlhf_jax: create a TPU VM or pod slice through queued
# resources, set up every worker, run a config on all of them, stream logs, delete.
#
#   launch/tpu.sh SUBCOMMAND [options] [--config.a.b=V ...] [-- more trainer flags]
#
# Run `launch/tpu.sh --help` for the options, and see launch/README.md for a
# walk-through on a v4-8 and a v5p-64. Every subcommand takes --dry-run, which
# prints the exact commands (one per line, prefixed "+ ", shell-quoted) and runs
# nothing. Written for bash >= 3.2 (macOS) so that a laptop can drive a pod.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu.sh SUBCOMMAND [options] [--config.a.b=V ...] [-- trainer flags]

subcommands
  create   request the TPU through a queued resource and wait until it is ACTIVE
  wait     wait until the queued resource is ACTIVE (fails if it FAILED/SUSPENDED)
  setup    copy the code (git archive of --ref) to every worker, make a venv,
           pip install 'jax[tpu]' and the package (-e)
  run      start `python -m rlhf_jax.train --config CFG --workdir gs://...` on every
           worker under nohup; log in ~/rlhf_jax/logs/run.log on each worker
  logs     stream the run logs of the workers (tail -F; Ctrl-C stops only the tail)
  stop     send SIGTERM to the run on every worker: it saves a checkpoint and exits
  status   describe the queued resource (its state, the node)
  delete   delete the queued resource and its TPU VMs (checkpoints on gs:// stay)
  all      create, setup, run, logs

options (flag, or environment variable)
  --project P            PROJECT          Google Cloud project (required)
  --zone Z               ZONE             zone with TPU quota, e.g. us-central2-b (required)
  --name N               TPU_NAME         queued resource and TPU VM name (required)
  --accelerator A        ACCELERATOR      create: v4-8, v5p-64, v5litepod-16, v6e-8, ...
  --runtime-version V    RUNTIME_VERSION  create: TPU VM image; default from the
                                          accelerator: v4 tpu-ubuntu2204-base, v5p
                                          v2-alpha-tpuv5, v5e v2-alpha-tpuv5-lite,
                                          v6e v2-alpha-tpuv6e
  --spot                 SPOT=1           create: Spot capacity (cheap, preemptible)
  --reserved             RESERVED=1       create: use the project's reservation
                                          (neither: on-demand)
  --valid-until-duration D                create: give up queueing after D (e.g. 6h)
  --no-wait                               create: return once the request is queued
  --ref R                REF              setup: git commit to ship (default HEAD;
                                          uncommitted changes are not shipped)
  --python-version V     PYTHON_VERSION   setup: venv Python (default 3.11, via uv)
  --jax-spec S           JAX_SPEC         setup: pip spec for JAX (default 'jax[tpu]')
  --config CFG[:ARG]                      run: config file, relative to the repo root
  --workdir gs://B/D                      run: run directory; must be on gs://
  --config.a.b=V                          run: config override, passed to the trainer
  --env NAME=VALUE                        run: export in the run's environment (repeatable)
  -- ARGS...                              run: further flags passed to the trainer
  --worker W                              logs, stop: worker number or all (default all)
  --yes, -y                               delete: do not ask for confirmation
  --dry-run              DRY_RUN=1        print the commands, run nothing

examples
  launch/tpu.sh all --project my-proj --zone us-central2-b --name rm-v4 \
      --accelerator v4-8 --spot --config configs/rm_hh.py --workdir gs://my-bucket/rm_hh
  launch/tpu.sh delete --project my-proj --zone us-central2-b --name rm-v4
EOF
}

die() {
  echo "error: $*" >&2
  exit 2
}

truthy() {  # truthy VALUE: 1/true/yes/on (any case) are true
  case $1 in
    1 | [Tt][Rr][Uu][Ee] | [Yy][Ee][Ss] | [Oo][Nn]) return 0 ;;
    *) return 1 ;;
  esac
}

# Quotes one word for a POSIX shell, like Python's shlex.quote: bare if it is made
# of safe characters only, otherwise single-quoted with ' written as '\''.
quote() {
  local sq="'" escaped_sq="'\\''"
  if [[ -n $1 && $1 =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//$sq/$escaped_sq}"
  fi
}

quote_words() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(quote "$word")"
  done
  printf '%s' "$out"
}

# Runs a command, or with --dry-run prints it; either way it is shown as "+ CMD".
run() {
  if truthy "$DRY_RUN"; then
    printf '+ %s\n' "$(quote_words "$@")"
  else
    printf '+ %s\n' "$(quote_words "$@")" >&2
    "$@"
  fi
}

# Like run, but tries again (ATTEMPTS times, 30 s apart): a TPU VM that has just
# become ACTIVE may still be booting and refuse ssh for a minute or two.
run_with_retries() {
  if truthy "$DRY_RUN"; then
    run "$@"
    return
  fi
  local attempt=1
  until run "$@"; do
    ((attempt < ATTEMPTS)) || return 1
    echo "attempt $attempt of $ATTEMPTS failed; trying again in 30 s" >&2
    attempt=$((attempt + 1))
    sleep 30
  done
}

join_statements() {  # join_statements STATEMENT... -> "S1; S2; ..."
  local out="" s
  for s in "$@"; do
    out+="${out:+; }$s"
  done
  printf '%s' "$out"
}

require() {  # require VARIABLE --flag
  [[ -n ${!1:-} ]] || die "$2 (or the environment variable $1) is required for '$SUBCOMMAND'"
}

# ---------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PROJECT=${PROJECT:-}
ZONE=${ZONE:-}
TPU_NAME=${TPU_NAME:-}
ACCELERATOR=${ACCELERATOR:-}
RUNTIME_VERSION=${RUNTIME_VERSION:-}
SPOT=${SPOT:-0}
RESERVED=${RESERVED:-0}
DRY_RUN=${DRY_RUN:-0}
REF=${REF:-HEAD}
PYTHON_VERSION=${PYTHON_VERSION:-3.11}
JAX_SPEC=${JAX_SPEC:-jax[tpu]}
POLL_SECONDS=${POLL_SECONDS:-30}
ATTEMPTS=${ATTEMPTS:-5}
VALID_UNTIL=""
WAIT=1
YES=0
WORKER=all
CONFIG=""
WORKDIR=""
TRAIN_ARGS=()
RUN_ENV=()

# On each worker everything lives in ~/rlhf_jax: src/ (the code), venv/,
# logs/run.log (this worker's output, appended to by every run) and run.pid.

if (($# == 0)); then
  usage >&2
  exit 2
fi
case $1 in
  -h | --help | help)
    usage
    exit 0
    ;;
  create | wait | setup | run | logs | stop | status | delete | all) SUBCOMMAND=$1 ;;
  *) die "unknown subcommand '$1' (one of create, wait, setup, run, logs, stop, status, delete, all)" ;;
esac
shift

while (($# > 0)); do
  case $1 in
    --dry-run) DRY_RUN=1 ;;
    --spot) SPOT=1 ;;
    --reserved) RESERVED=1 ;;
    --no-wait) WAIT=0 ;;
    -y | --yes) YES=1 ;;
    -h | --help)
      usage
      exit 0
      ;;
    --config.*) TRAIN_ARGS+=("$1") ;;  # an override: --config.a.b=V
    --)
      shift
      if (($# > 0)); then TRAIN_ARGS+=("$@"); fi  # (bash 3.2: "$@" of nothing is unbound)
      break
      ;;
    --*=*)  # --flag=value: split and parse again
      flag=${1%%=*}
      value=${1#*=}
      shift
      set -- "$flag" "$value" "$@"
      continue
      ;;
    --project | --zone | --name | --accelerator | --runtime-version | --valid-until-duration | \
      --ref | --python-version | --jax-spec | --config | --workdir | --env | --worker)
      (($# >= 2)) || die "$1 needs a value"
      case $1 in
        --project) PROJECT=$2 ;;
        --zone) ZONE=$2 ;;
        --name) TPU_NAME=$2 ;;
        --accelerator) ACCELERATOR=$2 ;;
        --runtime-version) RUNTIME_VERSION=$2 ;;
        --valid-until-duration) VALID_UNTIL=$2 ;;
        --ref) REF=$2 ;;
        --python-version) PYTHON_VERSION=$2 ;;
        --jax-spec) JAX_SPEC=$2 ;;
        --config) CONFIG=$2 ;;
        --workdir) WORKDIR=$2 ;;
        --env) RUN_ENV+=("$2") ;;
        --worker) WORKER=$2 ;;
      esac
      shift
      ;;
    *) die "unknown option '$1' for '$SUBCOMMAND' (see launch/tpu.sh --help)" ;;
  esac
  shift
done

LOCATION=(--zone="$ZONE" --project="$PROJECT")

# ---------------------------------------------------------------------------
# Checks, all made before anything is created
# ---------------------------------------------------------------------------
check_target() {
  require PROJECT --project
  require ZONE --zone
  require TPU_NAME --name
  [[ $TPU_NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
    die "--name '$TPU_NAME': use lower-case letters, digits and '-', starting with a letter"
}

default_runtime() {  # default_runtime ACCELERATOR
  case $1 in
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) return 1 ;;
  esac
}

check_create() {
  require ACCELERATOR --accelerator
  [[ $ACCELERATOR =~ ^v[0-9]+[a-z]*-[0-9]+$ ]] ||
    die "--accelerator '$ACCELERATOR' is not a TPU type like v4-8, v5p-64, v5litepod-16, v6e-8"
  if [[ -z $RUNTIME_VERSION ]]; then
    RUNTIME_VERSION=$(default_runtime "$ACCELERATOR") ||
      die "no default --runtime-version for '$ACCELERATOR'; pass one (gcloud compute tpus tpu-vm versions list --zone=$ZONE)"
  fi
  if truthy "$SPOT" && truthy "$RESERVED"; then
    die "--spot and --reserved exclude each other; give one, or neither for on-demand"
  fi
}

check_run() {
  [[ -n $CONFIG ]] || die "--config is required for '$SUBCOMMAND' (e.g. --config configs/rm_hh.py)"
  [[ -n $WORKDIR ]] || die "--workdir is required for '$SUBCOMMAND' (e.g. --workdir gs://BUCKET/RUN)"
  [[ $WORKDIR == gs://?* ]] ||
    die "--workdir '$WORKDIR' must be a gs:// path: a TPU VM's disk goes with the VM (and with a preemption), and every host of a pod must see the same checkpoints"
  local assignment
  for assignment in ${RUN_ENV[@]+"${RUN_ENV[@]}"}; do
    [[ $assignment =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env '$assignment' is not NAME=VALUE"
  done
}

check_worker() {
  [[ $WORKER == all || $WORKER =~ ^[0-9]+$ ]] || die "--worker '$WORKER' is not a worker number or 'all'"
}

# ---------------------------------------------------------------------------
# Subcommands
# ---------------------------------------------------------------------------
do_create() {
  local cmd=(gcloud compute tpus queued-resources create "$TPU_NAME"
    --node-id="$TPU_NAME"
    --accelerator-type="$ACCELERATOR"
    --runtime-version="$RUNTIME_VERSION"
    "${LOCATION[@]}")
  if truthy "$SPOT"; then cmd+=(--spot); fi
  if truthy "$RESERVED"; then cmd+=(--reserved); fi
  if [[ -n $VALID_UNTIL ]]; then cmd+=(--valid-until-duration="$VALID_UNTIL"); fi
  run "${cmd[@]}"
  if ((WAIT)); then do_wait; fi
}

do_wait() {
  local cmd=(gcloud compute tpus queued-resources describe "$TPU_NAME" "${LOCATION[@]}"
    --format='value(state.state)')
  if truthy "$DRY_RUN"; then
    run "${cmd[@]}"  # repeated every POLL_SECONDS until the state is ACTIVE
    return
  fi
  printf '+ %s  (every %s s until ACTIVE)\n' "$(quote_words "${cmd[@]}")" "$POLL_SECONDS" >&2
  local state last="" failures=0
  while true; do
    # A queue can take hours: ride out a few failed polls (network, token refresh).
    if ! state=$("${cmd[@]}"); then
      failures=$((failures + 1))
      ((failures < ATTEMPTS)) || die "could not describe queued resource $TPU_NAME $failures times in a row"
      sleep "$POLL_SECONDS"
      continue
    fi
    failures=0
    if [[ $state != "$last" ]]; then
      echo "$(date -u +%H:%M:%S) queued resource $TPU_NAME: $state" >&2
      last=$state
    fi
    case $state in
      ACTIVE) return 0 ;;
      FAILED | SUSPENDING | SUSPENDED | DELETING)
        echo "error: queued resource $TPU_NAME is $state; see: launch/tpu.sh status, then launch/tpu.sh delete" >&2
        exit 1
        ;;
    esac
    sleep "$POLL_SECONDS"
  done
}

# A remote statement that stops the command if a run is alive on the worker.
busy_check() {  # busy_check PID_FILE (a literal path)
  printf '%s' "if [ -f $1 ] && kill -0 \"\$(cat $1)\" 2>/dev/null; then echo \"error: a run is in progress on \$(hostname) (pid \$(cat $1)); see launch/tpu.sh logs / stop\" >&2; exit 1; fi"
}

do_setup() {
  local tarball="${TMPDIR:-/tmp}/rlhf_jax-$TPU_NAME.tar.gz"
  if ! truthy "$DRY_RUN" && [[ -n $(git -C "$REPO_ROOT" status --porcelain --untracked-files=no) ]]; then
    echo "warning: uncommitted changes in $REPO_ROOT are not shipped, only $REF" >&2
  fi
  run git -C "$REPO_ROOT" archive --format=tar.gz --output="$tarball" "$REF"
  run_with_retries gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:rlhf_jax.tar.gz" --worker=all "${LOCATION[@]}"
  local remote
  remote=$(join_statements \
    'set -e' \
    "$(busy_check rlhf_jax/run.pid)" \
    'mkdir -p rlhf_jax/logs' \
    'rm -rf rlhf_jax/src' \
    'mkdir rlhf_jax/src' \
    'tar -xzf rlhf_jax.tar.gz -C rlhf_jax/src' \
    'rm rlhf_jax.tar.gz' \
    '{ python3 -m pip install --user --quiet --upgrade uv || curl -LsSf https://astral.sh/uv/install.sh | sh; }' \
    "[ -x rlhf_jax/venv/bin/python ] || \"\$HOME/.local/bin/uv\" venv --seed --python $(quote "$PYTHON_VERSION") rlhf_jax/venv" \
    'rlhf_jax/venv/bin/pip install --quiet --upgrade pip' \
    "rlhf_jax/venv/bin/pip install --quiet $(quote "$JAX_SPEC") -e rlhf_jax/src" \
    "rlhf_jax/venv/bin/python -c 'import socket, jax, rlhf_jax; print(socket.gethostname(), \"ready, jax\", jax.__version__)'")
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all "${LOCATION[@]}" --command="$remote"
}

# Cloud TPU VMs describe their slice in metadata; rlhf_jax.train joins a multi-host
# run (jax.distributed.initialize) when TPU_WORKER_HOSTNAMES is set, so set it,
# with TPU_WORKER_ID, from the same metadata that JAX's TPU-VM detection reads.
read -r -d '' WORKER_ENV <<'EOF' || true
if [ -z "${TPU_WORKER_HOSTNAMES:-}" ]; then md=http://metadata.google.internal/computeMetadata/v1/instance/attributes; hosts=$(curl -sf -H Metadata-Flavor:Google "$md/worker-network-endpoints" | tr , '\n' | cut -d: -f3 | paste -sd, -); id=$(curl -sf -H Metadata-Flavor:Google "$md/agent-worker-number"); if [ -n "$hosts" ] && [ -n "$id" ]; then export TPU_WORKER_HOSTNAMES="$hosts" TPU_WORKER_ID="$id"; fi; fi
EOF

do_run() {
  # The same command on every worker, from ~/rlhf_jax/src so that --config paths
  # are relative to the repository root, as on a laptop.
  local args=(-m rlhf_jax.train --config "$CONFIG" --workdir "$WORKDIR")
  args+=(${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"})
  local statements=(
    "cd rlhf_jax/src || { echo \"error: rlhf_jax is not set up on \$(hostname); run launch/tpu.sh setup\" >&2; exit 1; }"
    "$(busy_check ../run.pid)"
    "mkdir -p ../logs"
    "$WORKER_ENV"
  )
  local assignment
  for assignment in ${RUN_ENV[@]+"${RUN_ENV[@]}"}; do
    statements+=("export ${assignment%%=*}=$(quote "${assignment#*=}")")
  done
  statements+=(
    "set -- $(quote_words "${args[@]}")"
    "echo \"=== \$(date -u +%FT%TZ) \$(hostname): python \$*\" >> ../logs/run.log"
    "nohup ../venv/bin/python \"\$@\" >> ../logs/run.log 2>&1 < /dev/null & echo \$! > ../run.pid"
    "echo \"\$(hostname): started pid \$(cat ../run.pid), log ~/rlhf_jax/logs/run.log\""
  )
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all "${LOCATION[@]}" \
    --command="$(join_statements "${statements[@]}")"
}

do_logs() {
  local remote="tail -n 200 -F rlhf_jax/logs/run.log | sed -u \"s/^/[\$(hostname)] /\""
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker="$WORKER" "${LOCATION[@]}" --command="$remote"
}

do_stop() {
  local pid="\"\$(cat rlhf_jax/run.pid)\""
  local remote="if [ -f rlhf_jax/run.pid ] && kill -0 $pid 2>/dev/null; then kill -TERM $pid; echo \"\$(hostname): sent SIGTERM to pid \$(cat rlhf_jax/run.pid); it saves a checkpoint and exits\"; else echo \"\$(hostname): no run in progress\"; fi"
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker="$WORKER" "${LOCATION[@]}" --command="$remote"
}

do_status() {
  run gcloud compute tpus queued-resources describe "$TPU_NAME" "${LOCATION[@]}"
}

do_delete() {
  local cmd=(gcloud compute tpus queued-resources delete "$TPU_NAME" "${LOCATION[@]}" --force)
  if ((YES)); then cmd+=(--quiet); fi
  run "${cmd[@]}"
}

check_target
case $SUBCOMMAND in
  create)
    check_create
    do_create
    ;;
  wait) do_wait ;;
  setup) do_setup ;;
  run)
    check_run
    do_run
    ;;
  logs)
    check_worker
    do_logs
    ;;
  stop)
    check_worker
    do_stop
    ;;
  status) do_status ;;
  delete) do_delete ;;
  all)
    check_create
    check_run
    do_create
    do_setup
    do_run
    do_logs
    ;;
esac
