#!/usr/bin/env bash
# What one message costs each server (issue #14): `loadgen --costs`, once for the accept
# path alone and once end to end, each on a fresh stack of its own (so a phase never pays
# for an earlier one's backlog, and SecantusDB starts empty both times).
# Usage: scripts/costs.sh [loadgen options, before the defaults --messages 2000 --connections 16]
#   e.g. --messages 3000, or --mongo-profile (SecantusDB profiling on during the load, to
#   count the documents each write carried; it costs SecantusDB CPU of its own)
#   COSTS_PHASES  "accept e2e" (default), or one of them
#   RECEIPTS=0    end to end without Twilio status callbacks (no PUBLIC_BASE_URL)
#   COSTS_BUILD   release (default) or debug: which binaries to build and run
#   COSTS_BIN     run the binaries in this folder instead, building nothing (an older
#                 commit's, copied aside, to compare side by side)
#   COSTS_WARMUP / COSTS_IDLE / COSTS_SETTLE  seconds after the service is ready / of the
#                 idle interval / of the wait after the load (default 5 / 10 / 3)
# Each phase also prints the service's peak memory (VmHWM), also in the JSON line
# (`service_peak_rss_mb`).
# The accept phase holds deliveries back as scripts/load.sh --accept-only does: a provider
# rate of 0.001 a second with a burst of 1 (the SMS stream is read and claimed, at most one
# message is sent). The stack lives in a temporary folder on ports of its own (override
# with STACK_*_PORT, see scripts/stack.sh) and is stopped and removed at the end.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
ARGS=("$@" --messages 2000 --connections 16)
# shellcheck source=lib/own-stack.sh
. "$ROOT/scripts/lib/own-stack.sh"
binaries "${COSTS_BIN:-}" "${COSTS_BUILD:-release}"
own_stack costs 6393 27029 9213 2528 4013 "${COSTS_PORT:-3093}"

# phase NAME PROVIDER_RATE PROVIDER_BURST: a fresh stack, the service, loadgen --costs.
phase() {
  fresh_stack
  start_service "$WORK/$1-service.log" PROVIDER_RATE_PER_SEC="$2" PROVIDER_BURST="$3"
  local pids="service=$svc" n
  for n in redis mongo es smtp sandbox; do pids="$pids,$n=$(cat "$STACK_DIR/$n.pid")"; done
  (
    eval "$(scripts/stack.sh env)"
    "$BIN/loadgen" --url "http://127.0.0.1:$PORT" --costs --phase "$1" --pids "$pids" \
      --warmup-seconds "${COSTS_WARMUP:-5}" --idle-seconds "${COSTS_IDLE:-10}" \
      --settle-seconds "${COSTS_SETTLE:-3}" \
      --json-out "$WORK/$1.json" "${ARGS[@]}"
  )
  # The service's peak memory over the phase (VmHWM), read before it stops.
  awk '/^VmHWM:/ {print int($2 / 1024)}' "/proc/$svc/status" >"$WORK/$1.rss" 2>/dev/null || echo 0 >"$WORK/$1.rss"
  echo "service peak RSS: $(cat "$WORK/$1.rss") MB (VmHWM)"
  stop_service
}

for p in ${COSTS_PHASES:-accept e2e}; do
  case $p in
    accept) phase accept 0.001 1 ;;
    e2e) phase e2e 100000 100000 ;;
    *) echo "COSTS_PHASES: accept and/or e2e, not $p" >&2; exit 2 ;;
  esac
done
# One JSON line with every phase, for whoever keeps the numbers.
printf '{"receipts":%s' "${RECEIPTS:-1}"
for p in ${COSTS_PHASES:-accept e2e}; do printf ',"%s":%s' "$p" "$(cat "$WORK/$p.json")"; done
printf ',"service_peak_rss_mb":{'
sep=""
for p in ${COSTS_PHASES:-accept e2e}; do printf '%s"%s":%s' "$sep" "$p" "$(cat "$WORK/$p.rss")"; sep=","; done
printf '}'
printf '}\n'
