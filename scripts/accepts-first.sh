#!/usr/bin/env bash
# Accepts first (issue #14): accept latency at a fixed request rate while the whole
# pipeline delivers (Twilio status callbacks included), with the adaptive store limiter on
# and off, side by side in one run: rounds alternate on, off, on, off..., each on a fresh
# stack of its own (temporary folder, its own ports, an empty SecantusDB), and each waits
# until every accepted message is reported sent.
# Usage: scripts/accepts-first.sh [loadgen options, before the defaults --rate 300 --seconds 60]
#   ROUNDS=2      rounds of each setting
#   MODES="on off" the settings, in the order of each round
#   RECEIPTS=0    without Twilio status callbacks
#   AF_BIN        run the binaries in this folder instead, building nothing (an older
#                 commit's, copied aside, to compare side by side)
# The stack's ports: STACK_*_PORT (see scripts/stack.sh), the service's AF_PORT (3095).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
ARGS=("$@" --rate 300 --seconds 60)
# shellcheck source=lib/own-stack.sh
. "$ROOT/scripts/lib/own-stack.sh"
binaries "${AF_BIN:-}"
own_stack accepts 6395 27031 9215 2530 4015 "${AF_PORT:-3095}"

summary=()
for round in $(seq 1 "${ROUNDS:-2}"); do
  for mode in ${MODES:-on off}; do
    case $mode in on) flag=true ;; off) flag=false ;; *) echo "MODES: on/off, not $mode" >&2; exit 2 ;; esac
    fresh_stack
    start_service "$WORK/service-$mode-$round.log" STORE_LIMITER=$flag \
      PROVIDER_RATE_PER_SEC=100000 PROVIDER_BURST=100000
    echo "== round $round, limiter $mode ($(date -u +%H:%M:%S) UTC, load average $(cut -d' ' -f1-3 /proc/loadavg))"
    "$BIN/loadgen" --url "http://127.0.0.1:$PORT" "${ARGS[@]}" | tee "$WORK/$mode-$round.out"
    stop_service
    out="$WORK/$mode-$round.out"
    summary+=("limiter $mode, round $round: $(grep -h '^accepted requests/s' "$out" | tr -d '\n'); $(grep -h '^accept latency' "$out" | tr -d '\n'); $(grep -h '^end to end' "$out" | tr -d '\n'); $(grep -h '^sent during' "$out" | tr -d '\n')")
  done
done
echo "== summary (${ARGS[*]}; receipts ${RECEIPTS:-1})"
printf '%s\n' "${summary[@]}"
