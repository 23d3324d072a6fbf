#!/usr/bin/env bash
# A Ray head on 127.0.0.1 with its dashboard (the Jobs API), and worker nodes that join it.
#   infra/local/ray.sh start | worker NAME | stop [NAME]
# Environment: DIFFORGE_BIND (127.0.0.1: the address this node binds and announces; a host's
# own address in multi-host mode), RAY_HEAD_ADDRESS (the head's address a worker joins; default
# DIFFORGE_BIND), RAY_PORT (6379), RAY_DASHBOARD_PORT (8265), RAY_NUM_CPUS (all), RAY_TEMP_DIR,
# RAY_AGENT_PORT (the node's dashboard agent, which runs submitted jobs; Ray's 52365) and
# RAY_CLIENT_PORT (10001), RAY_WORKER_AGENT_PORT (a joining node's agent): set them when several
# Ray nodes share one machine. RAY_AUTOSCALING_CONFIG: the head runs Ray's autoscaler with this
# cluster config (its node types and maxima; the head then starts with RAY_NUM_CPUS=0 as on
# KubeRay, and steps wait for the nodes they need). RAY_REDIS_ADDRESS and REDIS_PASSWORD: the
# head's GCS keeps its state in that Redis (fault tolerance: a restarted head keeps its jobs and
# its workers; RAY_external_storage_namespace keeps clusters sharing one Redis apart, and a
# worker waits RAY_gcs_rpc_server_reconnect_timeout_s for a head to come back). Ray's
# RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S (30) bounds how long `stop` lets running work drain.
# Token authentication stays on (Ray 2.60's default): the token is RAY_AUTH_TOKEN_PATH, or
# ~/.ray/auth_token, generated when missing; clients on this machine find it there.
# Each node runs with `--block` under its own pid, so `stop` ends only the nodes this script
# started, never another Ray on the machine (as `ray stop` would).
source "$(dirname "$0")/_lib.sh"
RAY_PORT="${RAY_PORT:-6379}"
RAY_DASHBOARD_PORT="${RAY_DASHBOARD_PORT:-8265}"
HOST="${DIFFORGE_BIND:-127.0.0.1}"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
cpus=(); [[ -n "${RAY_NUM_CPUS:-}" ]] && cpus=(--num-cpus "$RAY_NUM_CPUS")
agent=(); [[ -n "${RAY_AGENT_PORT:-}" ]] && agent=(--dashboard-agent-listen-port "$RAY_AGENT_PORT")
redis=(); [[ -n "${RAY_REDIS_ADDRESS:-}" ]] && redis=(--redis-password "${REDIS_PASSWORD:-}")
ensure_token() {
  if [[ "$RAY_AUTH_MODE" == token && -z "${RAY_AUTH_TOKEN:-}" ]]; then
    local path="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
    if [[ ! -s "$path" ]]; then
      mkdir -p "$(dirname "$path")"
      (umask 077; "$PYTHON" -c "import secrets; print(secrets.token_hex(32))" >"$path")
      echo "generated a Ray auth token in $path"
    fi
  fi
}
case "${1:-}" in
  start)
    ensure_token
    temp=(); [[ -n "${RAY_TEMP_DIR:-}" ]] && temp=(--temp-dir "$RAY_TEMP_DIR")
    start_bg ray-head ray start --head --block --node-ip-address "$HOST" \
      --port "$RAY_PORT" --dashboard-host "$HOST" --dashboard-port "$RAY_DASHBOARD_PORT" \
      --ray-client-server-port "${RAY_CLIENT_PORT:-10001}" \
      --disable-usage-stats "${cpus[@]}" "${temp[@]}" "${agent[@]}" "${redis[@]}" \
      ${RAY_AUTOSCALING_CONFIG:+--autoscaling-config "$RAY_AUTOSCALING_CONFIG"}
    url="http://$HOST:$RAY_DASHBOARD_PORT"
    wait_ready ray-head 90 "$PYTHON" -c \
      "from ray.job_submission import JobSubmissionClient as C; C('$url').list_jobs()"
    echo "Ray ready: DIFFORGE_CLUSTER=$url (GCS $HOST:$RAY_PORT, token auth $RAY_AUTH_MODE)"
    ;;
  worker)
    name="ray-worker-${2:?usage: $0 worker NAME}"
    head="${RAY_HEAD_ADDRESS:-$HOST}:$RAY_PORT"
    start_bg "$name" ray start --block --address "$head" \
      --node-ip-address "$HOST" --disable-usage-stats "${cpus[@]}" \
      ${RAY_WORKER_AGENT_PORT:+--dashboard-agent-listen-port "$RAY_WORKER_AGENT_PORT"}
    wait_ready "$name" 60 grep -q "Ray runtime started" "$STATE/$name.log"
    echo "$name joined $head"
    ;;
  stop)
    if [[ -n "${2:-}" ]]; then stop_bg "ray-worker-$2"; exit 0; fi
    nodes=(ray-head)
    for f in "$STATE"/ray-worker-*.pid; do [[ -e "$f" ]] && nodes+=("$(basename "$f" .pid)"); done
    stop_bg "${nodes[@]}"
    ;;
  *) echo "usage: $0 start | worker NAME | stop [NAME]" >&2; exit 2 ;;
esac
