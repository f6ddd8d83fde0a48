#!/usr/bin/env bash
# Run an MLflow tracking server for a workspace (default: this folder's SQLite store) on loopback.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
backend="${MLFLOW_BACKEND_STORE_URI:-sqlite:///$here/mlflow.db}"
artifacts="${MLFLOW_ARTIFACTS_DESTINATION:-$here/artifacts}"
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
exec "${MLFLOW_BIN:-mlflow}" server --backend-store-uri "$backend" --artifacts-destination "$artifacts" \
  --host 127.0.0.1 --port "${MLFLOW_PORT:-5000}" --workers 1
