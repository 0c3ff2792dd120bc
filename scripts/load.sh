#!/usr/bin/env bash
# The figures of the README's Performance section: the local stack, the release service
# with the client-side limits lifted (so the pipeline, not a limit, is measured), and
# loadgen against it. Usage: scripts/load.sh [loadgen options, e.g. --seconds 60]
#   RECEIPTS=0   run without Twilio status callbacks (no PUBLIC_BASE_URL)
#   LOAD_PORT    the service's port (default 3091)
#   LOAD_FRESH=1 stop the local stack and wipe its data first (.stack/); an --accept-only
#                run leaves its whole backlog queued there, so the next run wants this
#   LOAD_PROVIDER_RATE  sends a second per provider (default 100000: unlimited); 0.001
#                and LOAD_PROVIDER_BURST=1 with --accept-only: the accept path while nothing is sent
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
cargo build --release --bin comm-aggregator --bin loadgen --bin provider-sandbox
if [ "${LOAD_FRESH:-0}" = 1 ]; then
  scripts/stack.sh down || true
  for _ in $(seq 1 50); do pgrep -f "$ROOT/.stack" >/dev/null || break; sleep 0.2; done
  rm -rf "$ROOT/.stack"
fi
SANDBOX_BIN=target/release/provider-sandbox scripts/stack.sh up
export PORT="${LOAD_PORT:-3091}"
eval "$(scripts/stack.sh env)"
if [ "${RECEIPTS:-1}" = 0 ]; then unset PUBLIC_BASE_URL; fi
export DEV_MODE=true API_RATE_PER_SEC=1000000 API_BURST=1000000 RECIPIENT_MAX=0 DAILY_QUOTA=0 RECIPIENTS_PER_HOUR=0 \
  PROVIDER_RATE_PER_SEC="${LOAD_PROVIDER_RATE:-100000}" PROVIDER_BURST="${LOAD_PROVIDER_BURST:-100000}"
target/release/comm-aggregator >"$ROOT/.stack/load-service.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null && break
  sleep 0.2
done
echo "load: service pid $pid on :$PORT (receipts: ${RECEIPTS:-1}); log in .stack/load-service.log"
target/release/loadgen --url "http://127.0.0.1:$PORT" "$@"
