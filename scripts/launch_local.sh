#!/usr/bin/env bash
# Run a job on N local processes with torchrun (gloo on CPU, NCCL with one GPU per process).
#   scripts/launch_local.sh 2 conf/quickstart.yaml [key=value ...]
# Add --max-restarts through TORCHRUN_ARGS to survive a crashed rank (the job resumes from its
# last checkpoint by itself when the config says resume: auto).
set -euo pipefail
N="${1:?usage: launch_local.sh NPROC CONFIG [overrides]}"; shift
source "$(dirname "$0")/_python.sh"
PY="$(svi_python)"
exec "$PY" -m torch.distributed.run --standalone --nproc-per-node "$N" ${TORCHRUN_ARGS:-} -m svi fit "$@"
