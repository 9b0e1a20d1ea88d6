#!/usr/bin/env bash
# A Dask cluster for the reads: a scheduler here and W workers (run the worker line on other
# nodes to spread them). Point a job at it with data.scheduler=tcp://HOST:8786.
#   scripts/dask_cluster.sh 4            # scheduler + 4 workers on this machine; Ctrl-C stops all
# Uses the Python that has svi (scripts/_python.sh; PYTHON=... to choose), so it works from any install.
set -euo pipefail
source "$(dirname "$0")/_python.sh"
PY="$(svi_python)"
W="${1:-2}"; PORT="${DASK_PORT:-8786}"; HOST="${DASK_HOST:-$(hostname)}"
"$PY" -m distributed.cli.dask_scheduler --host "$HOST" --port "$PORT" --no-dashboard &
trap 'kill 0' EXIT
for _ in $(seq 50); do (echo > "/dev/tcp/$HOST/$PORT") 2>/dev/null && break; sleep 0.2; done
for _ in $(seq "$W"); do
  "$PY" -m distributed.cli.dask_worker "tcp://$HOST:$PORT" --nthreads "${DASK_THREADS:-2}" --no-dashboard &
done
echo "Dask scheduler at tcp://$HOST:$PORT with $W workers; use data.scheduler=tcp://$HOST:$PORT"
wait
