#!/usr/bin/env bash
# Runs one command on every worker (host) of a Cloud TPU VM pod slice, as one JAX job.
#
#   launch/tpu_pod.sh TPU_NAME ZONE [--project=P] [--sync_dir=DIR] [--num_workers=N]
#       [--log_dir=DIR] [--grace=S] [--skip_sync] [--dry_run] -- COMMAND [ARGS...]
#
#   launch/tpu_pod.sh my-v4-32 us-central2-b -- imagen-train \
#       --gin_file=experiments/imagen_base64.gin --gin.MODEL_DIR="'gs://my-bucket/base'"
#
# Steps (each a gcloud command; --dry_run prints them, one per line, shell-quoted, and runs
# nothing):
#   1. pack this checkout (without .git, .venv, .cache, logs, runs) into a tarball;
#   2. copy it to every worker: `gcloud compute tpus tpu-vm scp ... --worker=all`;
#   3. on every worker (`ssh --worker=all`): unpack into DIR (default `imagen-jax`, relative
#      to the remote home), create DIR/.venv if missing and `pip install -e . jax[tpu]`;
#   4. run COMMAND on every worker, one `gcloud compute tpus tpu-vm ssh --worker=i` per
#      worker in parallel, inside DIR with the venv active. Worker i's output goes to
#      LOG_DIR/worker_i.log (default logs/TPU_NAME/) and to the terminal prefixed "[i] ".
# --skip_sync skips 1-3 (code and venv already there).
#
# Every worker runs the same command; `jax.distributed.initialize()` (imagen_jax's
# `hosts.initialize`, with no multi-process flags) finds the other workers by itself on a
# TPU VM. The number of workers comes from `gcloud compute tpus tpu-vm describe` unless
# --num_workers is given (--dry_run needs it).
#
# Failure: when any worker's command fails, the others are stopped (SIGTERM to the remote
# process group, SIGKILL after --grace seconds, default 10), one line names the failed
# worker and its status, and the script exits with that status. Ctrl-C (or SIGTERM) sends
# SIGTERM to every worker: JAX's preemption service makes all hosts save the same step.
set -uo pipefail

me="tpu_pod.sh"
die() { echo "$me: $*" >&2; exit 2; }
usage() {
  echo "usage: $me TPU_NAME ZONE [--project=P] [--sync_dir=DIR] [--num_workers=N] [--log_dir=DIR] [--grace=S] [--skip_sync] [--dry_run] -- COMMAND..." >&2
  exit 2
}

[ $# -ge 2 ] || usage
tpu="$1"; zone="$2"; shift 2
[[ "$tpu" != -* && "$zone" != -* ]] || usage
project=""; sync_dir="imagen-jax"; num_workers=""; log_dir=""; grace=10
skip_sync=0; dry_run=0
while [ $# -gt 0 ]; do
  case "$1" in
    --project=*) project="${1#*=}" ;;
    --project) project="${2:-}"; shift ;;
    --sync_dir=*) sync_dir="${1#*=}" ;;
    --sync_dir) sync_dir="${2:-}"; shift ;;
    --num_workers=*) num_workers="${1#*=}" ;;
    --log_dir=*) log_dir="${1#*=}" ;;
    --grace=*) grace="${1#*=}" ;;
    --skip_sync) skip_sync=1 ;;
    --dry_run) dry_run=1 ;;
    --) shift; break ;;
    *) die "unknown option '$1' (options go before '--', the command after it)" ;;
  esac
  shift
done
[ $# -ge 1 ] || die "no COMMAND given after '--'"
[ -n "$sync_dir" ] || die "--sync_dir is empty"
[[ -z "$num_workers" || "$num_workers" =~ ^[1-9][0-9]*$ ]] \
  || die "--num_workers must be a positive integer, got '$num_workers'"
[[ "$grace" =~ ^[0-9]+$ ]] || die "--grace must be a whole number of seconds, got '$grace'"
cmd=("$@")
log_dir="${log_dir:-logs/$tpu}"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Arguments every gcloud tpu-vm command shares.
where=("--zone=$zone")
[ -n "$project" ] && where+=("--project=$project")

# Shell-quotes each argument (POSIX single quotes, readable, valid in any sh).
quote() {
  local a out=() q="'"
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+=("$a")
    else out+=("'${a//$q/$q\\$q$q}'"); fi
  done
  echo "${out[*]}"
}

# Runs a command, or prints it (shell-quoted, one line) under --dry_run.
run() {
  if [ "$dry_run" = 1 ]; then quote "$@"; else "$@"; fi
}

remote_tar="/tmp/imagen-jax-code.tar.gz"
qdir="$(quote "$sync_dir")"
# The remote scripts run in each worker's login shell, which starts in the home directory.
setup_script="set -e; mkdir -p $qdir; tar -xzf $remote_tar -C $qdir; cd $qdir; \
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi; \
.venv/bin/python -m pip install --quiet --upgrade pip; \
.venv/bin/python -m pip install --quiet -e . 'jax[tpu]>=0.10.2,<0.11'"
# $$ is the remote login shell (sshd made it a session leader): its process group holds
# the command and everything it starts. `stop` signals that group; after the command, the
# shell ends whatever the command left behind, which would keep the ssh session open.
run_script="cd $qdir && . .venv/bin/activate && echo \$\$ > .run.pgid && $(quote "${cmd[@]}"); \
rc=\$?; rm -f .run.pgid; trap '' TERM; kill -TERM -- -\$\$ 2>/dev/null; exit \$rc"
stop_script() {  # $1: the first signal
  echo "cd $qdir 2>/dev/null && [ -f .run.pgid ] || exit 0; g=\$(cat .run.pgid); \
kill -$1 -- -\$g 2>/dev/null; for t in \$(seq $((grace * 10))); do \
kill -0 -- -\$g 2>/dev/null || exit 0; sleep 0.1; done; kill -KILL -- -\$g 2>/dev/null; true"
}

# 1-3: sync the code and the environment.
if [ "$skip_sync" = 0 ]; then
  tarball="${TMPDIR:-/tmp}/imagen-jax-code-$tpu.tar.gz"
  run tar -czf "$tarball" -C "$repo" --exclude=./.git --exclude=./.venv --exclude=./.cache \
    --exclude=./logs --exclude=./runs --exclude='*.pyc' . || die "packing the code failed"
  run gcloud compute tpus tpu-vm scp "$tarball" "$tpu:$remote_tar" "${where[@]}" --worker=all \
    || die "copying the code to the workers failed"
  run gcloud compute tpus tpu-vm ssh "$tpu" "${where[@]}" --worker=all \
    "--command=$setup_script" || die "setting up the workers failed"
fi

# 4: the worker count, then the command on every worker.
if [ -z "$num_workers" ]; then
  [ "$dry_run" = 1 ] && die "--dry_run needs --num_workers=N (it does not ask gcloud)"
  endpoints="$(gcloud compute tpus tpu-vm describe "$tpu" "${where[@]}" \
    '--format=value(networkEndpoints[].ipAddress)')" || die "gcloud describe $tpu failed"
  num_workers="$(tr ';, ' '\n\n\n' <<< "$endpoints" | grep -c .)"
  [ "$num_workers" -ge 1 ] || die "found no workers for $tpu in zone $zone"
fi

if [ "$dry_run" = 1 ]; then
  for ((i = 0; i < num_workers; i++)); do
    run gcloud compute tpus tpu-vm ssh "$tpu" "${where[@]}" "--worker=$i" "--command=$run_script"
  done
  exit 0
fi

mkdir -p "$log_dir" || die "cannot create the log directory $log_dir"
workdir="$(mktemp -d)"
declare -a pids=() printers=()
declare -A index_of=() waiting=()
exec 3>&2  # our own messages
signals=0
final_message=""

stop_workers() {  # $1: signal; stops the command on every worker
  gcloud compute tpus tpu-vm ssh "$tpu" "${where[@]}" --worker=all \
    "--command=$(stop_script "$1")" > /dev/null 2>&1
}

cleanup() {
  if [ "${#waiting[@]}" -gt 0 ]; then
    stop_workers TERM
    for pid in "${!waiting[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  fi
  for pid in "${pids[@]}" "${printers[@]}"; do wait "$pid"; done
  [ -n "$final_message" ] && echo "$me: $final_message" >&3
  rm -rf "$workdir"
}
trap cleanup EXIT

on_signal() {
  signals=$((signals + 1))
  if [ "$signals" -ge 2 ]; then
    final_message="second $1: stopped every worker"
    exit 130
  fi
  echo "$me: $1 received: sending SIGTERM to every worker (they save and exit)" >&3
  stop_workers TERM &
}
trap 'on_signal INT' INT
trap 'on_signal TERM' TERM

for ((i = 0; i < num_workers; i++)); do
  fifo="$workdir/out.$i"
  mkfifo "$fifo"
  tee -a "$log_dir/worker_$i.log" < "$fifo" | sed -u "s/^/[$i] /" &
  printers+=($!)
  gcloud compute tpus tpu-vm ssh "$tpu" "${where[@]}" "--worker=$i" "--command=$run_script" \
    > "$fifo" 2>&1 < /dev/null &
  pids+=($!)
  index_of[$!]=$i
  waiting[$!]=1
done
echo "$me: running on $num_workers workers of $tpu; logs in $log_dir/worker_*.log" >&3
exec 2>/dev/null  # bash's own job reports would repeat our one line

running=$num_workers
while [ "$running" -gt 0 ]; do
  done_pid=""
  wait -n -p done_pid "${!waiting[@]}"
  rc=$?
  [ -z "$done_pid" ] && continue  # a trapped signal interrupted the wait
  i="${index_of[$done_pid]}"
  unset "waiting[$done_pid]"
  running=$((running - 1))
  if [ "$rc" -ne 0 ]; then
    final_message="worker $i exited with status $rc (see $log_dir/worker_$i.log); stopped the other $running worker(s)"
    exit "$rc"
  fi
done
exit 0
