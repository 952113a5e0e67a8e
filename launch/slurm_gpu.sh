#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one process per node, all local GPUs per process.
#
#   sbatch --nodes=4 --gpus-per-node=8 launch/slurm_gpu.sh --config experiments/paper_160m.py \
#          --data /shared/data/dclm --workdir /shared/runs/a2 --init-from /shared/runs/a1
#
# jax.distributed.initialize() reads the SLURM environment (coordinator = first node), so memlm
# needs no flags for it. Put data, run directory and bank on a filesystem every node sees.
#SBATCH --job-name=memlm
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
srun --kill-on-bad-exit=1 .venv/bin/memlm train "$@"
