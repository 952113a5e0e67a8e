#!/usr/bin/env bash
# Multi-node GPU training under SLURM, every GPU of every node used; submit from the repository root:
#
#   sbatch --nodes=4 --gpus-per-node=8 --ntasks-per-node=8 launch/slurm_gpu.sh \
#          --config experiments/paper_160m.py --data /shared/data/dclm --workdir /shared/runs/a2 \
#          --init-from /shared/runs/a1
#
# The batch step runs one srun step with --tasks-per-node T tasks on each node (default: one task
# per GPU; `--tasks-per-node 1` gives one process per node driving all its GPUs). Each task runs
# this script again (--task) and starts `memlm train` with explicit flags computed from the SLURM
# variables: --coordinator FIRST_NODE:PORT (PORT = 61440 + job id mod 4096, or MEMLM_PORT),
# --num-processes SLURM_NTASKS, --process-id SLURM_PROCID and --local-device-ids, the task's
# G / T GPUs of its node (ordinals SLURM_LOCALID*G/T ... when the task sees all the node's GPUs,
# 0 ... G/T-1 when SLURM already bound G/T GPUs to it). G: SLURM_GPUS_ON_NODE, else the entries of
# CUDA_VISIBLE_DEVICES, else nvidia-smi. Put the repository, data, run directory and bank on a
# filesystem every node sees.
#
# MEMLM: the memlm command (default .venv/bin/memlm). --dry-run or MEMLM_DRY_RUN=1: print the srun
# command, then the command each task would run (with the SLURM variables srun gives it), one per
# line, and run nothing.
#
# sbatch header: the job name; --ntasks-per-node and --gpus-per-node must equal the node's GPU count
# (8 here: override both on the sbatch line for other nodes); --exclusive gives the job whole nodes.
#SBATCH --job-name=memlm
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=8
#SBATCH --exclusive
set -euo pipefail

usage() {
  echo "usage: sbatch [--nodes=N --gpus-per-node=G --ntasks-per-node=G] launch/slurm_gpu.sh" \
       "[--tasks-per-node T] [--dry-run] [memlm train args...]${1:+ ($1)}" >&2
  exit 2
}

# The repository: sbatch runs a copy of this script from its spool directory, so look at the
# submit directory first.
root=${MEMLM_ROOT:-}
if [ -z "$root" ]; then
  for d in "${SLURM_SUBMIT_DIR:-}" "$(dirname "$0")/.."; do
    if [ -n "$d" ] && [ -f "$d/launch/slurm_gpu.sh" ]; then root=$(cd "$d" && pwd); break; fi
  done
fi
[ -n "$root" ] || usage "submit from the repository root (or set MEMLM_ROOT)"
cd "$root"
source launch/_common.sh

if [ -n "${MEMLM:-}" ]; then read -r -a memlm <<< "$MEMLM"; else memlm=(.venv/bin/memlm); fi
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"

# One task's command, from the SLURM variables srun set for it and the layout the batch step chose.
task_command() {
  local gpus=$MEMLM_GPUS_PER_NODE tasks=$MEMLM_TASKS_PER_NODE local_id=${SLURM_LOCALID:?not inside srun}
  local per=$((gpus / tasks)) visible=$gpus first d ids=()
  if [ -n "${CUDA_VISIBLE_DEVICES+x}" ]; then
    local v; IFS=, read -r -a v <<< "$CUDA_VISIBLE_DEVICES"; visible=${#v[@]}
  fi
  if [ "$visible" = "$gpus" ]; then first=$((local_id * per))
  elif [ "$visible" = "$per" ]; then first=0
  else usage "task $SLURM_PROCID sees $visible GPUs, expected $gpus (the node's) or $per (its own)"
  fi
  for ((d = first; d < first + per; d++)); do ids+=("$d"); done
  cmd=("${memlm[@]}" train "$@" --coordinator "$MEMLM_COORDINATOR" --num-processes "$SLURM_NTASKS"
       --process-id "$SLURM_PROCID" --local-device-ids "$(IFS=,; echo "${ids[*]}")")
}

if [ "${1:-}" = --task ]; then
  shift
  task_command "$@"
  exec "${cmd[@]}"
fi

tasks="" dry=$(dry_default)
while [ $# -gt 0 ]; do
  case $1 in
    --tasks-per-node) is_count "${2:-}" || usage "--tasks-per-node needs a positive integer"
                      tasks=$2; shift 2 ;;
    --dry-run) dry=1; shift ;;
    --) shift; break ;;
    *) break ;;
  esac
done
refuse_layout_flags " is set by the script" "$@"
if [ -z "${SLURM_JOB_ID:-}" ] || [ -z "${SLURM_JOB_NODELIST:-}" ]; then usage "not inside a SLURM job (submit with sbatch)"; fi

nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-}}
is_count "$nodes" || usage "SLURM_JOB_NUM_NODES is not set"
gpus=${SLURM_GPUS_ON_NODE:-}
if [ -z "$gpus" ] && [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
  IFS=, read -r -a v <<< "$CUDA_VISIBLE_DEVICES"; gpus=${#v[@]}
fi
if [ -z "$gpus" ] && command -v nvidia-smi > /dev/null 2>&1; then
  gpus=$(nvidia-smi -L 2> /dev/null | grep -c '^GPU ' || true)
fi
is_count "${gpus:-}" || usage "no GPU on the node (ask for them with --gpus-per-node)"
tasks=${tasks:-$gpus}
[ $((gpus % tasks)) = 0 ] || usage "--tasks-per-node $tasks does not divide the node's $gpus GPUs"

mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
[ "${#hosts[@]}" = "$nodes" ] || usage "SLURM_JOB_NODELIST names ${#hosts[@]} hosts, not $nodes"
export MEMLM_COORDINATOR="${hosts[0]}:${MEMLM_PORT:-$((61440 + SLURM_JOB_ID % 4096))}"
export MEMLM_GPUS_PER_NODE=$gpus MEMLM_TASKS_PER_NODE=$tasks

step=(srun --nodes="$nodes" --ntasks="$((nodes * tasks))" --ntasks-per-node="$tasks" --kill-on-bad-exit=1
      "$root/launch/slurm_gpu.sh" --task "$@")
if [ -z "$dry" ]; then exec "${step[@]}"; fi

show "${step[@]}"
for ((n = 0; n < nodes; n++)); do
  for ((l = 0; l < tasks; l++)); do
    (
      export SLURMD_NODENAME=${hosts[n]} SLURM_NODEID=$n SLURM_LOCALID=$l SLURM_PROCID=$((n * tasks + l))
      export SLURM_NTASKS=$((nodes * tasks))
      task_command "$@"
      show SLURMD_NODENAME="$SLURMD_NODENAME" SLURM_PROCID="$SLURM_PROCID" SLURM_LOCALID="$SLURM_LOCALID" \
           SLURM_NTASKS="$SLURM_NTASKS" XLA_PYTHON_CLIENT_MEM_FRACTION="$XLA_PYTHON_CLIENT_MEM_FRACTION" \
           "${cmd[@]}"
    )
  done
done
