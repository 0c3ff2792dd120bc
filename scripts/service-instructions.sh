#!/usr/bin/env bash
# The service's own work a message, in instructions (issue #14): the same end-to-end load as
# `scripts/costs.sh` (SMS to distinct recipients, every message sent through the Twilio
# stand-in with its status callback), with the service under valgrind's callgrind, which
# counts the instructions each function runs. The count does not depend on what else the
# machine is doing, so two builds compare within a percent or two on a busy machine, where
# their CPU time a message moves by more than the change. It counts user space only (the
# kernel's share, about a quarter of the service's CPU in `perf`, is not in it) and the
# service runs about fifty times slower under it, so its batches are larger than at full
# speed: compare builds with it, and quote CPU time from `scripts/costs.sh`.
# Usage: scripts/service-instructions.sh [loadgen options, before the defaults
#   --messages 1000 --connections 4]
#   INSTR_BIN   run the binaries in this folder instead of building (another commit's)
#   INSTR_IDLE  seconds of the idle interval measured before the load (default 10): its
#               instructions a second, times the load's length, are subtracted
#   INSTR_TOP   how many groups of the load's instructions to print (default 25)
#   INSTR_KEEP  a folder to copy the callgrind files into (callgrind_annotate reads them)
# Prints the load's instructions a message, a table of where they went (each function's own
# instructions, grouped by crate; the C library's allocator and mimalloc each as one group)
# and a JSON line.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
if ! command -v valgrind >/dev/null 2>&1; then
  echo "[instructions] installing valgrind from Debian" >&2
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq valgrind >/dev/null
fi
ARGS=("$@" --messages 1000 --connections 4)
# shellcheck source=lib/own-stack.sh
. "$ROOT/scripts/lib/own-stack.sh"
binaries "${INSTR_BIN:-}"
# Ports of its own, apart from costs.sh's and accepts-first.sh's, so they can run beside it.
own_stack instr 6398 27034 9218 2533 4018 "${INSTR_PORT:-3098}"

fresh_stack
# The callgrind files: one per `callgrind_control -d` (the idle interval, then the load).
OUT="$WORK/callgrind.out"
start_service "$WORK/service.log" PROVIDER_RATE_PER_SEC=100000 PROVIDER_BURST=100000 \
  SERVICE_WRAPPER="valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file=$OUT"
sleep 5
now() { date +%s.%N; }
callgrind_control -i on "$svc" >/dev/null
t0=$(now)
sleep "${INSTR_IDLE:-10}"
callgrind_control -d "$svc" >/dev/null
t1=$(now)
(
  eval "$("$ROOT/scripts/stack.sh" env)"
  "$BIN/loadgen" --url "http://127.0.0.1:$PORT" "${ARGS[@]}"
) | tee "$WORK/loadgen.txt"
sleep 3   # the LogIndexer's hold and the last receipts
callgrind_control -d "$svc" >/dev/null
t2=$(now)
for _ in $(seq 1 50); do [ -s "$OUT.2" ] && break; sleep 0.2; done
[ -n "${INSTR_KEEP:-}" ] && { mkdir -p "$INSTR_KEEP"; cp "$OUT".[12] "$INSTR_KEEP/"; }

python3 - "$OUT.1" "$OUT.2" "$t0" "$t1" "$t2" "$WORK/loadgen.txt" "${INSTR_TOP:-25}" <<'EOF'
import collections, json, re, subprocess, sys
idle_file, load_file, t0, t1, t2, loadgen, top = sys.argv[1:]
t0, t1, t2, top = float(t0), float(t1), float(t2), int(top)
text = open(loadgen).read()
m = re.search(r"(\d+) messages sent", text)
errors = re.search(r"(\d+) errors", text)
if not m:
    sys.exit("loadgen did not report its messages sent:\n" + text)
sent = int(m.group(1))
if errors and int(errors.group(1)):
    sys.exit(f"loadgen saw {errors.group(1)} errors: the figure would not be per message")

def totals(path):
    for line in open(path):
        if line.startswith("totals:"):
            return int(line.split()[1])
    sys.exit(f"no totals in {path}")

def groups(path):
    out = subprocess.run(["callgrind_annotate", "--inclusive=no", "--threshold=100", path],
                         capture_output=True, text=True, check=True).stdout
    g = collections.Counter()
    for line in out.splitlines():
        m = re.match(r"\s*([\d,]+) \(\s*[\d.]+%\)\s+(.*)$", line)
        if not m or "PROGRAM TOTALS" in line:
            continue
        n, where = int(m.group(1).replace(",", "")), m.group(2)
        fn = where.split(":", 1)[1] if ":" in where else where
        if "libc.so" in where or where.startswith("./"):
            key = "libc: malloc/free" if "malloc" in where else "libc: " + fn.split(" ")[0]
        elif re.match(r"_?mi_", fn):
            key = "mimalloc"
        else:
            key = re.split(r"::|<| as |\[", fn.lstrip("<&"))[0] or fn
        g[key] += n
    return g

idle_rate = totals(idle_file) / (t1 - t0)
load = totals(load_file)
per_msg = (load - idle_rate * (t2 - t1)) / sent
g = groups(load_file)
whole = sum(g.values())
print(f"\nservice instructions: {per_msg:,.0f} a message ({sent} messages, load "
      f"{t2 - t1:.1f} s; idle {idle_rate:,.0f} a second subtracted)")
print("where the load's instructions went (each function's own, by crate):")
for k, v in g.most_common(top):
    print(f"  {100 * v / whole:5.1f} %  {v / sent:>10,.0f} a message  {k}")
print(json.dumps({"messages": sent, "instructions_per_message": round(per_msg),
                  "idle_per_second": round(idle_rate), "load_seconds": round(t2 - t1, 1),
                  "by_crate_per_message": {k: round(v / sent) for k, v in g.most_common(top)}}))
EOF
