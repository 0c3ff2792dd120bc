"""What the size of a group commit costs SecantusDB: its CPU time and the wall time per
document for `insert_many` of the router's records in batches of 1 to 32, with the
service's indexes on `communications` (as scripts/index-costs.py builds them), on a
SecantusDB of its own (started here, in a temporary folder, stopped at the end).

    .venv/bin/python scripts/insert-batches.py
    DOCS=3200 ROUNDS=3 .venv/bin/python scripts/insert-batches.py

Every command has a cost of its own besides its documents (the wire, the profiler check,
one storage transaction with its journal commit), so many small inserts cost the store more
than a few large ones. This is why the router keeps few group commits in flight
(`router.max_inflight`): requests that arrive while one is written join the next.
"""
import datetime
import importlib.util
import os
import time

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("index_costs", os.path.join(HERE, "index-costs.py"))
costs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(costs)

N = int(os.environ.get("DOCS", "1600"))
ROUNDS = int(os.environ.get("ROUNDS", "2"))
SIZES = [1, 2, 4, 8, 16, 32]


def one_round():
    with costs.secantus_with(costs.SETS["service"], "insert-batches") as (proc, _db, col):
        out = {}
        for size in SIZES:
            now = datetime.datetime.now(datetime.timezone.utc)
            docs = [costs.record(k, now) for k in range(N)]
            cpu0, t0 = costs.cpu(proc.pid), time.time()
            for a in range(0, N, size):
                col.insert_many(docs[a:a + size], ordered=False)
            out[size] = ((costs.cpu(proc.pid) - cpu0) / N * 1e6, (time.time() - t0) / N * 1e6)
        return out


def main():
    runs = [one_round() for _ in range(ROUNDS)]
    print(f"SecantusDB per document inserted ({N} documents a size, {ROUNDS} rounds: lowest-highest)")
    print(f"{'batch':>6} {'CPU µs':>12} {'wall µs':>12}")
    for size in SIZES:
        cpu = [r[size][0] for r in runs]
        wall = [r[size][1] for r in runs]
        print(f"{size:>6} {min(cpu):>5.0f}-{max(cpu):<6.0f} {min(wall):>5.0f}-{max(wall):<6.0f}", flush=True)


if __name__ == "__main__":
    main()
