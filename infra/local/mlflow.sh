#!/usr/bin/env bash
# An MLflow tracking server on 127.0.0.1: one worker, jobs off (FACTS: 0.5 GB instead of 3.5).
#   infra/local/mlflow.sh start|stop
# Environment: MLFLOW_PORT (5000), MLFLOW_BACKEND_STORE (default SQLite in the state folder;
# postgresql+psycopg2://... for Postgres, see postgres.sh), MLFLOW_ARTIFACTS (default
# s3://mlflow/artifacts when AWS_ENDPOINT_URL is set, else a local folder). With S3 artifacts
# the server holds the S3 credentials and clients need none (--artifacts-destination).
# MLFLOW_ALLOWED_HOSTS: the Host headers it answers (--allowed-hosts; MLflow's default is
# localhost and private addresses): list the names other hosts reach it by.
source "$(dirname "$0")/_lib.sh"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
HOST="${DIFFORGE_BIND:-127.0.0.1}"
case "${1:-}" in
  start)
    backend="${MLFLOW_BACKEND_STORE:-sqlite:///$STATE/mlflow.db}"
    if [[ -n "${AWS_ENDPOINT_URL:-}" ]]; then
      artifacts="${MLFLOW_ARTIFACTS:-s3://mlflow/artifacts}"
      export MLFLOW_S3_ENDPOINT_URL="${MLFLOW_S3_ENDPOINT_URL:-$AWS_ENDPOINT_URL}"
    else
      artifacts="${MLFLOW_ARTIFACTS:-$STATE/mlartifacts}"
    fi
    allowed=(); [[ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]] && allowed=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS")
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false start_bg mlflow mlflow server \
      --host "$HOST" --port "$MLFLOW_PORT" --workers 1 "${allowed[@]}" \
      --backend-store-uri "$backend" --artifacts-destination "$artifacts"
    wait_ready mlflow 120 curl -sf "http://$HOST:$MLFLOW_PORT/health"
    echo "MLflow ready: MLFLOW_TRACKING_URI=http://$HOST:$MLFLOW_PORT (artifacts $artifacts)"
    ;;
  stop) stop_bg mlflow ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
