# Shared by the service scripts: state folder, background start with a pid file, clean stop.
set -euo pipefail
STATE="${DIFFORGE_LOCAL:-${DIFFORGE_HOME:-$HOME/.difforge}/local}"
mkdir -p "$STATE"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# The project's virtual environment when there is one, else whatever is on PATH.
VENV_BIN="$(cd "$HERE/../.." && pwd)/.venv/bin"
if [[ -x "$VENV_BIN/python" ]]; then export PATH="$VENV_BIN:$PATH"; fi
PYTHON="${PYTHON:-python}"

# start_bg NAME CMD...: run CMD in the background, its pid in $STATE/NAME.pid, log in NAME.log.
start_bg() {
  local name="$1"; shift
  if [[ -f "$STATE/$name.pid" ]] && kill -0 "$(cat "$STATE/$name.pid")" 2>/dev/null; then
    echo "$name already running (pid $(cat "$STATE/$name.pid"))" >&2
    return 0
  fi
  nohup "$@" >"$STATE/$name.log" 2>&1 </dev/null &
  echo $! >"$STATE/$name.pid"
}

# wait_ready NAME SECONDS CHECK...: poll CHECK until it succeeds; on timeout show the log.
wait_ready() {
  local name="$1" seconds="$2"; shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    if ! kill -0 "$(cat "$STATE/$name.pid")" 2>/dev/null; then
      echo "$name exited during start-up; its log ($STATE/$name.log):" >&2
      tail -20 "$STATE/$name.log" >&2
      return 1
    fi
    if ((SECONDS >= deadline)); then
      echo "$name not ready after ${seconds}s; its log ($STATE/$name.log):" >&2
      tail -20 "$STATE/$name.log" >&2
      return 1
    fi
    sleep 0.3
  done
}

# stop_bg NAME...: SIGTERM to each (together), then SIGKILL what is left after 60 s; only the
# processes this folder started.
stop_bg() {
  local name pid pids=() names=()
  for name in "$@"; do
    if [[ -f "$STATE/$name.pid" ]]; then
      pid="$(cat "$STATE/$name.pid")"
      if kill -TERM "$pid" 2>/dev/null; then pids+=("$pid"); fi
      names+=("$name")
    else
      echo "$name not running"
    fi
  done
  for _ in $(seq 1 600); do
    local alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    ((alive)) || break
    sleep 0.1
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  for name in "${names[@]}"; do rm -f "$STATE/$name.pid"; echo "$name stopped"; done
}
