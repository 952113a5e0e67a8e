#!/usr/bin/env bash
# TPU pod slice: the same command on every host (jax discovers the pod from the TPU metadata).
#
#   TPU=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh --config experiments/paper_410m.py \
#       --data gs://bucket/data --workdir gs://bucket/runs/b2 --init-from gs://bucket/runs/b1
#
# Assumes memlm is installed in ~/memlm/.venv on every host (e.g. `make install` via --worker=all).
set -euo pipefail
: "${TPU:?set TPU to the pod name}" "${ZONE:?set ZONE}"
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all \
  --command "cd ~/memlm && .venv/bin/memlm train${args}"
