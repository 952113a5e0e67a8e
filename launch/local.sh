#!/usr/bin/env bash
# One machine, all its accelerators (or the CPU): prepare the default corpus if needed, then train.
#   launch/local.sh [--config FILE] [--config.train.steps=N ...]
set -euo pipefail
cd "$(dirname "$0")/.."
make -s install
[ -f data/facts/manifest.json ] || .venv/bin/memlm prepare
exec .venv/bin/memlm train "$@"
