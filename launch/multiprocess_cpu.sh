#!/usr/bin/env bash
# Runs N local copies of a JAX program as one multi-process job on simulated CPU devices:
# a pod slice on one machine, for development and tests.
#
#   launch/multiprocess_cpu.sh N [--devices_per_process=2] [--port=PORT] [--timeout=SECONDS]
#       [--grace=SECONDS] -- COMMAND [ARGS...]
#
#   launch/multiprocess_cpu.sh 2 -- python -m imagen_jax.cli.smoke --workdir=/tmp/s
#   launch/multiprocess_cpu.sh 2 -- imagen-train --gin_file=... --gin.MODEL_DIR="'runs/mp'"
#
# Process i runs `COMMAND ARGS... --coordinator_address=localhost:PORT --process_count=N
# --process_index=i` with JAX_PLATFORMS=cpu and XLA_FLAGS asking for D simulated devices
# (other XLA_FLAGS are kept), without PYTHONUNBUFFERED, and without JAX's persistent
# compilation cache unless JAX_ENABLE_COMPILATION_CACHE is set (see below). Its output
# lines, stdout and stderr alike, come out whole on our stdout, prefixed with "[i] " (each
# stream in its order; a stdout line and a stderr line written close together may swap).
# PORT defaults to a free port outside the ephemeral range. Each process runs in its own
# process group.
#
# Exit status: 0 when every process exits 0. As soon as one fails, the others are stopped
# (SIGTERM to their process groups, SIGKILL after --grace seconds, default 2), one line
# names the failed process and its status, and the launcher exits with that status.
# --timeout stops everything after that many seconds (status 124). SIGINT/SIGTERM to the
# launcher are forwarded to every process (JAX turns SIGTERM into a synchronised
# preemption); a second one kills them.
set -uo pipefail

me="multiprocess_cpu.sh"
usage() {
  echo "usage: $me N [--devices_per_process=D] [--port=P] [--timeout=S] [--grace=S] -- COMMAND..." >&2
  exit 2
}
die() { echo "$me: $*" >&2; exit 2; }

[ $# -ge 1 ] || usage
num="$1"; shift
[[ "$num" =~ ^[1-9][0-9]*$ ]] || die "N must be a positive integer, got '$num'"
devices=2; port=""; timeout=0; grace=2
while [ $# -gt 0 ]; do
  case "$1" in
    --devices_per_process=*) devices="${1#*=}" ;;
    --port=*) port="${1#*=}" ;;
    --timeout=*) timeout="${1#*=}" ;;
    --grace=*) grace="${1#*=}" ;;
    --) shift; break ;;
    *) die "unknown option '$1' (options go before '--', the command after it)" ;;
  esac
  shift
done
[ $# -ge 1 ] || die "no COMMAND given after '--'"
[[ "$devices" =~ ^[1-9][0-9]*$ ]] || die "--devices_per_process must be a positive integer, got '$devices'"
[[ "$timeout" =~ ^[0-9]+$ ]] || die "--timeout must be a whole number of seconds, got '$timeout'"
[[ "$grace" =~ ^[0-9]+$ ]] || die "--grace must be a whole number of seconds, got '$grace'"
cmd=("$@")

# The project's virtual environment, when there is one, provides python and imagen-*.
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[ -d "$repo/.venv/bin" ] && export PATH="$repo/.venv/bin:$PATH"
command -v "${cmd[0]}" >/dev/null || die "command not found: '${cmd[0]}'"

if [ -z "$port" ]; then
  # Outside the ephemeral range: no outgoing connection can take it before process 0 binds it.
  port="$(python3 "$repo/imagen_jax/parallel/ports.py")" \
    || die "could not pick a free port; pass --port=P"
fi
[[ "$port" =~ ^[0-9]+$ ]] || die "--port must be a number, got '$port'"

xla_flags="$(sed -E 's/--xla_force_host_platform_device_count=[^ ]*//g' <<< "${XLA_FLAGS:-}")"
xla_flags="${xla_flags} --xla_force_host_platform_device_count=${devices}"

workdir="$(mktemp -d)"
declare -a pids=() printers=()
declare -A index_of=() waiting=()  # waiting: processes not yet reaped
exec 3>&2  # our own messages
timer=""
signals=0
final_message=""  # printed last, after every process's output

# Stops every process group that still has members (a process that exited may have left
# children behind): SIGTERM, then SIGKILL after the grace period (JAX catches SIGTERM as a
# preemption notice, so a JAX process usually needs the SIGKILL).
stop_all() {
  local pid t
  local -a live=()
  for pid in "${pids[@]}"; do kill -0 -- "-$pid" 2>/dev/null && live+=("$pid"); done
  [ "${#live[@]}" -eq 0 ] && return
  for pid in "${live[@]}"; do kill -TERM -- "-$pid" 2>/dev/null; done
  for ((t = 0; t < grace * 10; t++)); do
    for pid in "${live[@]}"; do kill -0 -- "-$pid" 2>/dev/null && break; pid=""; done
    [ -z "$pid" ] && return
    sleep 0.1
  done
  for pid in "${live[@]}"; do kill -KILL -- "-$pid" 2>/dev/null; done
}

cleanup() {
  local status=$?
  stop_all
  [ -n "$timer" ] && kill "$timer" 2>/dev/null
  # Let the line printers flush what the processes wrote last.
  for pid in "${pids[@]}" "${printers[@]}"; do wait "$pid"; done
  if [ -n "$final_message" ]; then
    echo "$me: $final_message" >&3
  elif [ "$status" -ne 0 ]; then  # an error in this script: never fail without a word
    echo "$me: failed with status $status: $(tail -n 1 "$workdir/bash.err" 2>/dev/null)" >&3
  fi
  rm -rf "$workdir"
}
trap cleanup EXIT

on_signal() {
  local sig="$1" pid
  signals=$((signals + 1))
  if [ "$signals" -ge 2 ]; then
    final_message="second $sig: killed all $num processes"
    for pid in "${!waiting[@]}"; do kill -KILL -- "-$pid" 2>/dev/null; done
    exit 130
  fi
  echo "$me: $sig received: forwarding it to all $num processes" >&3
  for pid in "${!waiting[@]}"; do kill "-$sig" -- "-$pid" 2>/dev/null; done
}
trap 'on_signal INT' INT
trap 'on_signal TERM' TERM

describe() {  # an exit status in words
  local rc="$1"
  if [ "$rc" -gt 128 ]; then
    echo "was killed by signal $((rc - 128)) (SIG$(kill -l $((rc - 128)) 2>/dev/null || echo '?'))"
  else
    echo "exited with status $rc"
  fi
}

for ((i = 0; i < num; i++)); do
  # Stdout and stderr each get their own fifo and printer, so that a library's log line on
  # stderr never lands inside a line the program is printing on stdout. Each printer
  # prefixes whole lines and writes them to our stdout; it ends when every writer of its
  # fifo has exited.
  for stream in out err; do
    mkfifo "$workdir/$stream.$i"
    sed -u "s/^/[$i] /" < "$workdir/$stream.$i" &
    printers+=($!)
  done
  (
    trap - INT TERM
    export JAX_PLATFORMS=cpu XLA_FLAGS="$xla_flags"
    # Only process 0 writes JAX's persistent compilation cache, and on CPU the others' cache
    # keys differ from its own: with the cache, process 0 loads a program in a second while
    # the others compile it for many, and gloo's CPU collectives give up after 30 s of
    # waiting for a peer. Compiling in every process keeps them in step.
    export JAX_ENABLE_COMPILATION_CACHE="${JAX_ENABLE_COMPILATION_CACHE:-false}"
    # PYTHONUNBUFFERED (set by many CI runners) makes Python write a printed line and its
    # newline in two writes, and unbuffers C's stdout too, so a native library printing on
    # stdout (Gloo's "Rank 0 is connected") can land inside a line of ours.
    unset JAX_NUM_CPU_DEVICES JAX_COORDINATOR_ADDRESS PYTHONUNBUFFERED
    # setsid: a process group of its own (we are not a group leader, so no fork), which
    # stop_all can signal as a whole, children included.
    exec setsid "${cmd[@]}" "--coordinator_address=localhost:$port" \
      "--process_count=$num" "--process_index=$i"
  ) > "$workdir/out.$i" 2> "$workdir/err.$i" < /dev/null &
  pids+=($!)
  index_of[$!]=$i
  waiting[$!]=1
done

# From here on bash's own job reports ("line 73: 1234 Aborted ( ... )" when a process
# dies from a signal) would only repeat our one line, so they go to a file (cleanup
# shows its last line if this script itself fails) and our messages go to fd 3.
exec 2>"$workdir/bash.err"

if [ "$timeout" -gt 0 ]; then
  sleep "$timeout" &
  timer=$!
fi

# Each pass collects every process that has ended; `wait -n` only wakes us when a job
# ends (a process, a line printer, the timer) or a signal arrives. It cannot be trusted
# to name the process: bash may drop a finished job from its table between two waits
# (at once when a signal killed it), and `wait -n` never names a job it has dropped. But
# `wait PID` keeps the exit status of every child we started.
while :; do
  for pid in "${!waiting[@]}"; do
    kill -0 "$pid" 2>/dev/null && continue  # still running (or not yet reaped)
    wait "$pid"
    rc=$?
    unset "waiting[$pid]"
    if [ "$rc" -ne 0 ]; then
      final_message="process ${index_of[$pid]} (pid $pid) $(describe "$rc"); stopped the other ${#waiting[@]} process(es)"
      exit "$rc"
    fi
  done
  [ "${#waiting[@]}" -eq 0 ] && exit 0
  if [ -n "$timer" ] && ! kill -0 "$timer" 2>/dev/null; then
    timer=""
    final_message="timed out after ${timeout}s; stopped all $num processes"
    exit 124
  fi
  wait -n
  [ $? -eq 127 ] && sleep 0.1  # no job left to wait for (all reaped): do not spin
done
