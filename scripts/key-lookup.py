"""How long SecantusDB takes to find the record holding an Idempotency-Key (what a keyed
retry waits for: the insert clashes on the unique index, then the holder is read), with
the lookup and index of before 2026-11-29 (`{idempotencyKey: {$in}}` under the partial
(`tenant`, `idempotencyKey`) index) and of now (`{tenantKey: {$in}}` under a sparse
unique index), as the collection grows. Each shape runs on a SecantusDB of its own
(started here, in a temporary folder, stopped at the end).

    .venv/bin/python scripts/key-lookup.py
    SIZES=1000,20000 KEYED=0.1 LOOKUPS=20 .venv/bin/python scripts/key-lookup.py

KEYED is the share of records that carry a key (1.0: all).
"""
import datetime
import importlib.util
import os
import statistics
import time

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("index_costs", os.path.join(HERE, "index-costs.py"))
costs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(costs)

SIZES = [int(s) for s in os.environ.get("SIZES", "1000,10000,20000").split(",")]
KEYED = float(os.environ.get("KEYED", "1.0"))
LOOKUPS = int(os.environ.get("LOOKUPS", "20"))
SHAPES = {
    "before (idempotencyKey $in, partial per-tenant index)": (
        "before 2026-11-29", lambda k: {"idempotencyKey": {"$in": [k]}}),
    "now (tenantKey $in, sparse unique index)": (
        "service", lambda k: {"tenantKey": {"$in": [f"t:{k}"]}}),
}


def records(start, n):
    now = datetime.datetime.now(datetime.timezone.utc)
    out = []
    for k in range(start, start + n):
        d = costs.record(k, now, status="sent", attempts=1)
        del d["nextAttemptAt"]
        if int((k + 1) * KEYED) > int(k * KEYED):
            d["idempotencyKey"] = f"key-{k}"
            d["tenantKey"] = f"t:key-{k}"
        out.append(d)
    return out


def one_shape(index_set, lookup):
    with costs.secantus_with(costs.SETS[index_set], "key-lookup") as (_proc, _db, col):
        out, have = {}, 0
        for size in SIZES:
            docs = records(have, size - have)
            for a in range(0, len(docs), 256):
                col.insert_many(docs[a:a + 256], ordered=False)
            have = size
            keyed = [d["idempotencyKey"] for d in col.find({"idempotencyKey": {"$exists": True}},
                                                          {"idempotencyKey": 1}).limit(LOOKUPS)]
            took = []
            for k in keyed:
                t0 = time.perf_counter()
                found = list(col.find(lookup(k)))
                took.append((time.perf_counter() - t0) * 1000)
                assert len(found) == 1, (k, found)
            out[size] = statistics.median(took)
        return out


def main():
    print(f"SecantusDB: one keyed lookup, median of {LOOKUPS} (ms); {KEYED:.0%} of records keyed")
    print(f"{'shape':<56}" + "".join(f"{s:>10,}" for s in SIZES))
    for name, (index_set, lookup) in SHAPES.items():
        got = one_shape(index_set, lookup)
        print(f"{name:<56}" + "".join(f"{got[s]:>10.1f}" for s in SIZES), flush=True)


if __name__ == "__main__":
    main()
