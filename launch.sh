#!/usr/bin/env bash
# Runs an mspec experiment module on this machine.
#
#   ./launch.sh experiments.pretrain --config experiments/configs/pretrain_frad.py:tiny --workdir runs/tiny
#
# Multi-host launching (TPU pod slices, Slurm, N local processes) is not implemented yet; this
# script only runs the module with the current Python on the local machine.
set -euo pipefail
if [ "$#" -lt 1 ] || [ "$1" = "--help" ] || [ "$1" = "-h" ]; then
  sed -n '2,7p' "$0"
  exit 0
fi
cd "$(dirname "$0")"
exec python -m "$@"
