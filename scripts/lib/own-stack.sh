# Sourced by scripts/costs.sh, scripts/accepts-first.sh and scripts/service-instructions.sh:
# a local stack of their own
# (in a temporary folder, on their own ports) and the service on it, with the client-side
# limits lifted so that the pipeline, not a limit, is measured. Needs ROOT; call binaries
# (BIN) and own_stack first; the service's pid is kept in `svc`, the folder is WORK.
svc=""

# binaries FOLDER [PROFILE]: BIN is FOLDER (another commit's binaries, copied aside, to
# compare side by side; nothing is built), or, without one, the service, loadgen and the
# provider stand-in built with PROFILE (release, or debug) into target/.
binaries() {
  if [ -n "$1" ]; then
    BIN="$(cd "$1" && pwd)"
  else
    local profile="${2:-release}" flag=""
    [ "$profile" = release ] && flag="--release"
    cargo build $flag --bin comm-aggregator --bin loadgen --bin provider-sandbox
    BIN="$ROOT/target/$profile"
  fi
}

# own_stack NAME REDIS MONGO ES SMTP SANDBOX SERVICE: the default ports (each overridden by
# STACK_*_PORT, the service's by PORT_VAR's value), and a temporary folder /tmp/comm-agg-NAME.*
# (WORK) with the stack's data in WORK/stack.
own_stack() {
  export STACK_REDIS_PORT="${STACK_REDIS_PORT:-$2}" STACK_MONGO_PORT="${STACK_MONGO_PORT:-$3}"
  export STACK_ES_PORT="${STACK_ES_PORT:-$4}" STACK_SMTP_PORT="${STACK_SMTP_PORT:-$5}"
  export STACK_SANDBOX_PORT="${STACK_SANDBOX_PORT:-$6}" PORT="$7"
  WORK="$(mktemp -d "/tmp/comm-agg-$1.XXXXXX")"
  export STACK_DIR="$WORK/stack"
  trap 'stop_service; stack_down; rm -rf "$WORK"' EXIT
}

# Stop the stack and wait until its processes (by the pids it wrote) are gone.
stack_down() {
  local pids="" n
  for n in redis mongo es smtp sandbox; do
    [ -f "$STACK_DIR/$n.pid" ] && pids="$pids $(cat "$STACK_DIR/$n.pid")"
  done
  "$ROOT/scripts/stack.sh" down >/dev/null 2>&1 || true
  for _ in $(seq 1 50); do
    local alive=""
    for n in $pids; do kill -0 "$n" 2>/dev/null && alive=1; done
    [ -z "$alive" ] && return 0
    sleep 0.2
  done
}

# A fresh stack: stopped, its data removed, started again.
fresh_stack() {
  stack_down; rm -rf "$STACK_DIR"
  SANDBOX_BIN="$BIN/provider-sandbox" "$ROOT/scripts/stack.sh" up >&2
}

# start_service LOG [VAR=value ...]: the service on the stack, with these variables too
# (RECEIPTS=0: without Twilio status callbacks; SERVICE_CONFIG=FILE: another config.toml;
# SERVICE_WRAPPER="valgrind ...": the command the service runs under); returns once it is ready.
start_service() {
  local log="$1"; shift
  (
    eval "$("$ROOT/scripts/stack.sh" env)"
    if [ "${RECEIPTS:-1}" = 0 ]; then unset PUBLIC_BASE_URL; fi
    export DEV_MODE=true API_RATE_PER_SEC=1000000 API_BURST=1000000 RECIPIENT_MAX=0 DAILY_QUOTA=0 \
      RECIPIENTS_PER_HOUR=0 "$@"
    # shellcheck disable=SC2086 # the wrapper is a command line, split on purpose
    exec ${SERVICE_WRAPPER:-} "$BIN/comm-aggregator" ${SERVICE_CONFIG:+--config "$SERVICE_CONFIG"}
  ) >"$log" 2>&1 &
  svc=$!
  for _ in $(seq 1 150); do
    curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null && return 0
    kill -0 "$svc" 2>/dev/null || { tail -20 "$log" >&2; exit 1; }
    sleep 0.2
  done
}

stop_service() {
  if [ -n "$svc" ]; then kill "$svc" 2>/dev/null || true; wait "$svc" 2>/dev/null || true; svc=""; fi
}
