#!/usr/bin/env bash
# The whole platform on this machine, on 127.0.0.1: S3 (SeaweedFS), MLflow (artifacts on that
# S3) and a Ray head. Stop it with infra/local/down.sh. Ports and folders: see each script.
set -euo pipefail
here="$(dirname "$0")"
host="${DIFFORGE_BIND:-127.0.0.1}"
export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:?set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for the local S3}"
export AWS_ENDPOINT_URL="http://$host:${S3_PORT:-28333}"
"$here/s3.sh" start
"$here/mlflow.sh" start
"$here/ray.sh" start
cat <<MSG

The platform is up. In your shell:
  export AWS_ENDPOINT_URL=$AWS_ENDPOINT_URL
  export MLFLOW_TRACKING_URI=http://$host:${MLFLOW_PORT:-5000}
  export DIFFORGE_CLUSTER=http://$host:${RAY_DASHBOARD_PORT:-8265}
then: difforge submit pipelines/quickstart.yaml --set storage=s3://datasets/quickstart \\
        --env AWS_ACCESS_KEY_ID --env AWS_SECRET_ACCESS_KEY --env AWS_ENDPOINT_URL
MSG
