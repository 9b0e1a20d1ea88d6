#!/usr/bin/env bash
# A Dask cluster for the reads: a scheduler here and W workers (run the worker line on other
# nodes to spread them). Point a job at it with data.scheduler=tcp://HOST:8786.
#   scripts/dask_cluster.sh 4            # scheduler + 4 workers on this machine; Ctrl-C stops all
set -euo pipefail
W="${1:-2}"; PORT="${DASK_PORT:-8786}"; HOST="${DASK_HOST:-$(hostname)}"
BIN="$(dirname "$0")/../.venv/bin"
"$BIN/dask" scheduler --host "$HOST" --port "$PORT" &
trap 'kill 0' EXIT
sleep 3
for _ in $(seq "$W"); do "$BIN/dask" worker "tcp://$HOST:$PORT" --nthreads 2 & done
echo "Dask scheduler at tcp://$HOST:$PORT with $W workers; use data.scheduler=tcp://$HOST:$PORT"
wait
