#!/usr/bin/env bash
# One machine: prepare the default corpus if needed, then train on all its accelerators (or the CPU).
#
#   launch/local.sh [--processes N] [--devices D] [--platform cpu|gpu] [--port P] [--dry-run] [TRAIN ARGS...]
#
# Without --processes (or with 1): one `memlm train` process using every local device.
# With --processes N: N `memlm train` processes on loopback (127.0.0.1, a free port), the local
# devices split among them without overlap (GPU: --local-device-ids slices of the visible GPUs;
# CPU: --xla_force_host_platform_device_count per process, D / N each, D defaulting to the count
# already in XLA_FLAGS, else N), each given --coordinator --num-processes --process-id. Waits for
# all; if one fails the others are stopped (SIGTERM, then SIGKILL after 10 s) and its exit status
# is returned. SIGTERM / SIGINT to this script are passed on (every process saves and stops).
#
# MEMLM: the memlm command (default .venv/bin/memlm, after `make install`).
# --dry-run or MEMLM_DRY_RUN=1: print the commands, one per line with their environment, run nothing.
set -euo pipefail

usage() {
  echo "usage: launch/local.sh [--processes N] [--devices D] [--platform cpu|gpu] [--port P] [--dry-run]" \
       "[memlm train args...]${1:+ ($1)}" >&2
  exit 2
}

source "$(dirname "$0")/_common.sh"

processes=1 devices="" platform="" port="" dry=$(dry_default)
while [ $# -gt 0 ]; do
  case $1 in
    --processes) is_count "${2:-}" || usage "--processes needs a positive integer"
                 processes=$2; shift 2 ;;
    --devices) is_count "${2:-}" || usage "--devices needs a positive integer"
               devices=$2; shift 2 ;;
    --platform) [[ ${2:-} =~ ^(cpu|gpu)$ ]] || usage "--platform is cpu or gpu"
                platform=$2; shift 2 ;;
    --port) is_count "${2:-}" || usage "--port needs a port number"
            port=$2; shift 2 ;;
    --dry-run) dry=1; shift ;;
    --) shift; break ;;
    *) break ;;
  esac
done
refuse_layout_flags " is set by the script" "$@"

cd "$(dirname "$0")/.."


if [ -n "${MEMLM:-}" ]; then
  read -r -a memlm <<< "$MEMLM"
else
  memlm=(.venv/bin/memlm)
  if [ -n "$dry" ]; then show make -s install; else make -s install; fi
fi

data_given=0
for a in "$@"; do case $a in --data|--data=*) data_given=1 ;; esac; done
if [ "$data_given" = 0 ] && [ ! -f data/facts/manifest.json ]; then
  if [ -n "$dry" ]; then show "${memlm[@]}" prepare; else "${memlm[@]}" prepare; fi
fi

if [ "$processes" = 1 ]; then
  if [ -n "$dry" ]; then show "${memlm[@]}" train "$@"; exit 0; fi
  exec "${memlm[@]}" train "$@"
fi

# The local devices: GPUs when nvidia-smi lists some (and JAX_PLATFORMS does not say cpu), else the CPU.
gpu_count() {
  if [ -n "${CUDA_VISIBLE_DEVICES+x}" ]; then
    local ids; IFS=, read -r -a ids <<< "$CUDA_VISIBLE_DEVICES"; echo "${#ids[@]}"; return
  fi
  command -v nvidia-smi > /dev/null 2>&1 || { echo 0; return; }
  nvidia-smi -L 2> /dev/null | grep -c '^GPU ' || true
}
if [ -z "$platform" ]; then
  if [[ ${JAX_PLATFORMS:-} == cpu* ]] || [ "$(gpu_count)" = 0 ]; then platform=cpu; else platform=gpu; fi
fi

forced=""
if [[ ${XLA_FLAGS:-} =~ --xla_force_host_platform_device_count=([0-9]+) ]]; then forced=${BASH_REMATCH[1]}; fi
if [ "$platform" = gpu ]; then
  available=$(gpu_count)
  [ "$available" -gt 0 ] || usage "--platform gpu: no GPU visible"
  devices=${devices:-$available}
  [ "$devices" -le "$available" ] || usage "--devices $devices: only $available GPUs visible"
else
  devices=${devices:-${forced:-$processes}}
fi
[ $((devices % processes)) = 0 ] || usage "$devices devices do not split evenly over $processes processes"
per=$((devices / processes))

if [ -z "$port" ]; then
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi

# One process's command: its environment assignments, then memlm train with its flags.
process_command() {
  local i=$1 env=()
  shift
  if [ "$platform" = cpu ]; then
    local flags=${XLA_FLAGS:-}
    flags=${flags//--xla_force_host_platform_device_count=$forced/}
    flags="${flags:+$flags }--xla_force_host_platform_device_count=$per"
    env=(JAX_PLATFORMS=cpu "XLA_FLAGS=${flags# }")
  fi
  cmd=(env "${env[@]}" "${memlm[@]}" train "$@" --coordinator "127.0.0.1:$port"
       --num-processes "$processes" --process-id "$i")
  if [ "$platform" = gpu ]; then
    local ids=() d
    for ((d = i * per; d < (i + 1) * per; d++)); do ids+=("$d"); done
    cmd+=(--local-device-ids "$(IFS=,; echo "${ids[*]}")")
  fi
}

if [ -n "$dry" ]; then
  for ((i = 0; i < processes; i++)); do process_command "$i" "$@"; show "${cmd[@]:1}"; done
  exit 0
fi

pids=()
signal_all() {  # send $1 to every process still running
  local pid
  for pid in "${pids[@]}"; do
    if [ -n "$pid" ]; then kill "-$1" "$pid" 2> /dev/null || true; fi
  done
}
stop_all() {  # SIGTERM, then SIGKILL to those left after 10 s
  local pid t alive
  signal_all TERM
  for ((t = 0; t < 50; t++)); do
    alive=0
    for pid in "${pids[@]}"; do
      if [ -n "$pid" ] && kill -0 "$pid" 2> /dev/null; then alive=1; fi
    done
    [ "$alive" = 0 ] && return
    sleep 0.2
  done
  signal_all KILL
}
trap 'signal_all TERM' INT TERM  # every process saves and stops

for ((i = 0; i < processes; i++)); do
  process_command "$i" "$@"
  "${cmd[@]}" &
  pids+=("$!")
done

status=0 left=$processes
while [ "$left" -gt 0 ]; do
  for i in "${!pids[@]}"; do
    pid=${pids[$i]}
    [ -n "$pid" ] || continue
    kill -0 "$pid" 2> /dev/null && continue
    rc=0; wait "$pid" || rc=$?
    pids[i]="" left=$((left - 1))
    if [ "$rc" != 0 ] && [ "$status" = 0 ]; then
      status=$rc
      echo "local.sh: process $i exited with status $rc: stopping the others" >&2
      stop_all
    fi
  done
  [ "$left" -gt 0 ] && sleep 0.2
done
exit "$status"
