#!/usr/bin/env bash
# The MLflow UI on the embedded store (or the store given): http://127.0.0.1:5000
#   scripts/mlflow_ui.sh [sqlite:///mlflow.db]
set -euo pipefail
exec "$(dirname "$0")/../.venv/bin/mlflow" ui --backend-store-uri "${1:-sqlite:///mlflow.db}" --host 127.0.0.1 --port "${PORT:-5000}"
