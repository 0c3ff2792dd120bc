#!/usr/bin/env bash
# The local stack, on loopback, with everything under .stack/ (git-ignored):
#   Redis (AOF on), SecantusDB (MongoDB wire protocol, on disk), osmem-server
#   (Elasticsearch API), aiosmtpd (SMTP, mail kept as a maildir) and provider-sandbox
#   (Twilio + WhatsApp Cloud API stand-in).
# Usage: scripts/stack.sh install|up|down|status|env
# STACK_DIR: where the data, logs and pid files go (default .stack/; scripts/costs.sh uses
# a temporary one so that it never touches the `make run` stack's data).
# Ports (override with these variables; the defaults avoid the usual 6379/27017/9200):
#   STACK_REDIS_PORT=6391 STACK_MONGO_PORT=27027 STACK_ES_PORT=9211
#   STACK_SMTP_PORT=2526 STACK_SANDBOX_PORT=4011
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DIR="${STACK_DIR:-$ROOT/.stack}"
VENV="$ROOT/.venv"
REDIS_PORT="${STACK_REDIS_PORT:-6391}"
MONGO_PORT="${STACK_MONGO_PORT:-27027}"
ES_PORT="${STACK_ES_PORT:-9211}"
SMTP_PORT="${STACK_SMTP_PORT:-2526}"
SANDBOX_PORT="${STACK_SANDBOX_PORT:-4011}"
PY_PACKAGES="secantusdb==0.7.0b3 osmem-server==0.1.6 aiosmtpd==1.4.6"
ST_VENV="$ROOT/.venv-st"
ST_PACKAGE="schemathesis==4.32.5"

log() { printf '[stack] %s\n' "$*" >&2; }

install() {
  if ! command -v redis-server >/dev/null 2>&1; then
    log "installing redis-server from Debian"
    local sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq redis-server >/dev/null
  fi
  # promtool (Debian's prometheus package): the tests lint /metrics, the alert rules and
  # the scrape config with it.
  if ! command -v promtool >/dev/null 2>&1; then
    log "installing prometheus (for promtool) from Debian"
    local sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  fi
  if [ ! -x "$VENV/bin/secantusd-py" ] || ! "$VENV/bin/python" -c 'import osmem_server, aiosmtpd' 2>/dev/null; then
    log "installing $PY_PACKAGES into .venv"
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check $PY_PACKAGES
  fi
  # The API fuzzer the tests run against the OpenAPI document, in its own environment.
  if [ ! -x "$ST_VENV/bin/schemathesis" ]; then
    log "installing $ST_PACKAGE into .venv-st"
    [ -x "$ST_VENV/bin/python" ] || python3 -m venv "$ST_VENV"
    "$ST_VENV/bin/pip" install -q --disable-pip-version-check "$ST_PACKAGE"
  fi
}

osmem_bin() {
  "$VENV/bin/python" - <<'PY'
import os, osmem_server
print(os.path.join(os.path.dirname(osmem_server.__file__), "bin", "osmem-server"))
PY
}

sandbox_bin() {
  if [ -n "${SANDBOX_BIN:-}" ]; then echo "$SANDBOX_BIN"; return; fi
  (cd "$ROOT" && cargo build -q --bin provider-sandbox >&2)
  echo "$ROOT/target/debug/provider-sandbox"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

running() { [ -f "$DIR/$1.pid" ] && kill -0 "$(cat "$DIR/$1.pid")" 2>/dev/null; }

start() { # name port command...
  local name="$1" port="$2"; shift 2
  if running "$name"; then return 0; fi
  if port_open "$port"; then
    log "port $port is already taken by another program: set STACK_${name^^}_PORT to a free port"
    exit 1
  fi
  mkdir -p "$DIR/$name"
  setsid nohup "$@" >"$DIR/$name.log" 2>&1 &
  echo $! >"$DIR/$name.pid"
}

wait_for() { # name port
  local name="$1" port="$2" i
  for i in $(seq 1 150); do
    if port_open "$port"; then return 0; fi
    if ! running "$name"; then log "$name exited; see $DIR/$name.log"; tail -20 "$DIR/$name.log" >&2; exit 1; fi
    sleep 0.1
  done
  log "$name did not open port $port within 15 s; see $DIR/$name.log"; exit 1
}

up() {
  install
  mkdir -p "$DIR"
  start redis "$REDIS_PORT" redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --dir "$DIR/redis" \
    --appendonly yes --appendfsync everysec --save "" --protected-mode yes
  # The service writes with j:true (journaled: survives a crash of the server);
  # STACK_MONGO_SYNC=1 also fsyncs every commit (survives power loss), at about 5x the cost.
  local sync=""; [ "${STACK_MONGO_SYNC:-0}" = 1 ] && sync="--sync-on-commit"
  start mongo "$MONGO_PORT" "$VENV/bin/secantusd-py" $sync --host 127.0.0.1 --port "$MONGO_PORT" --storage-path "$DIR/mongo/data"
  start es "$ES_PORT" "$(osmem_bin)" -addr "127.0.0.1:$ES_PORT" -no-stdin-watch
  mkdir -p "$DIR/smtp/mail/tmp" "$DIR/smtp/mail/new" "$DIR/smtp/mail/cur"
  start smtp "$SMTP_PORT" "$VENV/bin/python" -m aiosmtpd -n -l "127.0.0.1:$SMTP_PORT" -c aiosmtpd.handlers.Mailbox "$DIR/smtp/mail"
  start sandbox "$SANDBOX_PORT" "$(sandbox_bin)" --addr "127.0.0.1:$SANDBOX_PORT"
  wait_for redis "$REDIS_PORT"; wait_for mongo "$MONGO_PORT"; wait_for es "$ES_PORT"
  wait_for smtp "$SMTP_PORT"; wait_for sandbox "$SANDBOX_PORT"
  # SecantusDB opens its port before it answers commands: wait for a ping.
  for _ in $(seq 1 100); do
    "$VENV/bin/python" -c "import pymongo,sys; pymongo.MongoClient('mongodb://127.0.0.1:$MONGO_PORT/?directConnection=true', serverSelectionTimeoutMS=500).admin.command('ping')" 2>/dev/null && break
    sleep 0.2
  done
  status
}

down() {
  local n
  for n in sandbox smtp es mongo redis; do
    if running "$n"; then kill "$(cat "$DIR/$n.pid")" 2>/dev/null || true; fi
    rm -f "$DIR/$n.pid"
  done
  log "stopped (data kept in $DIR; remove it to start empty)"
}

status() {
  local n port
  for n in redis mongo es smtp sandbox; do
    case $n in redis) port=$REDIS_PORT;; mongo) port=$MONGO_PORT;; es) port=$ES_PORT;; smtp) port=$SMTP_PORT;; sandbox) port=$SANDBOX_PORT;; esac
    if running "$n"; then printf '%-8s up    127.0.0.1:%s (pid %s, log %s/%s.log)\n' "$n" "$port" "$(cat "$DIR/$n.pid")" "$DIR" "$n"
    else printf '%-8s down  127.0.0.1:%s\n' "$n" "$port"; fi
  done
}

# The service's environment for this stack (sandbox credentials unless real ones are set).
envvars() {
  cat <<EOV
export REDIS_URL=redis://127.0.0.1:$REDIS_PORT
export MONGODB_URL='mongodb://127.0.0.1:$MONGO_PORT/?directConnection=true'
export ELASTICSEARCH_NODE=http://127.0.0.1:$ES_PORT
export SMTP_URL=\${SMTP_URL:-smtp://127.0.0.1:$SMTP_PORT}
export PUBLIC_BASE_URL=\${PUBLIC_BASE_URL:-http://127.0.0.1:\${PORT:-3001}}
if [ -z "\${ACCOUNTSID:-}" ]; then
  export TWILIO_API_BASE=http://127.0.0.1:$SANDBOX_PORT ACCOUNTSID=AC00000000000000000000000000000000 AUTHTOKEN=sandbox-auth-token
fi
if [ -z "\${WHATSAPP_TOKEN:-}" ]; then
  export WHATSAPP_API_BASE=http://127.0.0.1:$SANDBOX_PORT/v21.0 WHATSAPP_TOKEN=sandbox-whatsapp-token WHATSAPP_PHONE_NUMBER_ID=100000000000001
  export WHATSAPP_APP_SECRET=sandbox-app-secret WHATSAPP_VERIFY_TOKEN=sandbox-verify-token
  curl -s -XPOST http://127.0.0.1:$SANDBOX_PORT/__sandbox/webhooks -H 'content-type: application/json' \
    -d "{\"whatsapp\": \"http://127.0.0.1:\${PORT:-3001}/api/v1/callbacks/whatsapp\"}" >/dev/null || true
fi
if [ -z "\${VONAGE_API_KEY:-}" ]; then
  export VONAGE_API_BASE=http://127.0.0.1:$SANDBOX_PORT VONAGE_API_KEY=sandboxkey VONAGE_API_SECRET=sandbox-vonage-secret
  export VONAGE_SIGNATURE_SECRET=sandbox-vonage-signature-secret
fi
if [ -z "\${SENDGRID_API_KEY:-}" ]; then
  export SENDGRID_API_BASE=http://127.0.0.1:$SANDBOX_PORT SENDGRID_API_KEY=SG.sandbox-sendgrid-key
  export SENDGRID_WEBHOOK_PUBLIC_KEY=MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEK9bD4IMlz2G7NOB5/jQwuhCO8Jm9KXQJY9/8QbFsQMckVLQagkh54yMBsTqFAy3/Z1IhaEZenOC3wYvKJVycEA==
  curl -s -XPOST http://127.0.0.1:$SANDBOX_PORT/__sandbox/webhooks -H 'content-type: application/json' \
    -d "{\"sendgrid\": \"http://127.0.0.1:\${PORT:-3001}/api/v1/callbacks/sendgrid\"}" >/dev/null || true
fi
EOV
}

case "${1:-}" in
  install) install ;;
  up) up ;;
  down) down ;;
  status) status ;;
  env) envvars ;;
  *) echo "usage: $0 install|up|down|status|env" >&2; exit 2 ;;
esac
