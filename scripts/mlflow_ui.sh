#!/usr/bin/env bash
# The MLflow UI on the embedded store (or the store given): http://127.0.0.1:5000
#   scripts/mlflow_ui.sh [sqlite:///mlflow.db]
set -euo pipefail
source "$(dirname "$0")/_python.sh"
PY="$(svi_python)"
exec "$PY" -m mlflow ui --backend-store-uri "${1:-sqlite:///mlflow.db}" --host 127.0.0.1 --port "${PORT:-5000}"
