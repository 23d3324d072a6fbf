#!/usr/bin/env bash
# Stop what up.sh started (data stays in the state folder).
set -uo pipefail
here="$(dirname "$0")"
"$here/ray.sh" stop
"$here/mlflow.sh" stop
"$here/s3.sh" stop
