#!/usr/bin/env bash
# TPU pod slice: the same `memlm train` on every worker at once (gcloud ... ssh --worker=all). No
# coordinator flags: jax finds the pod's workers, its own process id and all local chips from the
# TPU metadata, so every chip of every worker is used.
#
#   TPU=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh --config experiments/paper_410m.py \
#       --data gs://bucket/data --workdir gs://bucket/runs/b2 --init-from gs://bucket/runs/b1
#
# TPU, ZONE: the pod slice and its zone; PROJECT: the gcloud project (default: gcloud's own).
# MEMLM_DIR: the repository on every worker (default $HOME/memlm, with memlm installed in its .venv,
# e.g. by `make install` over --worker=all). --dry-run or MEMLM_DRY_RUN=1: print the gcloud command
# and run nothing.
set -euo pipefail

usage() {
  echo "usage: TPU=NAME ZONE=ZONE [PROJECT=P] launch/tpu_pod.sh [--dry-run] [memlm train args...]${1:+ ($1)}" >&2
  exit 2
}

source "$(dirname "$0")/_common.sh"

dry=$(dry_default)
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) dry=1; shift ;;
    --) shift; break ;;
    *) break ;;
  esac
done
refuse_layout_flags ": jax detects the pod itself" "$@"
[ -n "${TPU:-}" ] || usage "set TPU to the pod slice's name"
[ -n "${ZONE:-}" ] || usage "set ZONE to its zone"

remote_dir=${MEMLM_DIR:-\$HOME/memlm}
args=""
[ $# -gt 0 ] && printf -v args ' %q' "$@"
cmd=(gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" ${PROJECT:+--project "$PROJECT"} --worker=all
     --command "cd $remote_dir && .venv/bin/memlm train$args")
if [ -n "$dry" ]; then show "${cmd[@]}"; exit 0; fi
exec "${cmd[@]}"
