"""What each MongoDB index on `communications` costs SecantusDB on every write: the server's
CPU time per document for the writes a message makes (the router's insert, the claim read,
the outcome write, a receipt), in the shapes the service sends them, for several sets of
indexes. Each set runs on a SecantusDB of its own (started here, in a temporary folder,
stopped at the end), so the CPU is that process's alone (/proc/<pid>/stat).

    .venv/bin/python scripts/index-costs.py
    INDEX_SETS="service,id-only" DOCS=3000 ROUNDS=2 .venv/bin/python scripts/index-costs.py

SecantusDB derives every index's keys for every document it writes, including a sparse
index whose field the document lacks, and an update deletes and rewrites the entries of
every index (secantus/storage.py: _write_index_entries, _delete_index_entries).
"""
import contextlib
import datetime
import os
import shutil
import subprocess
import tempfile
import time

import pymongo
from bson import ObjectId
from pymongo.write_concern import WriteConcern

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVER = os.path.join(ROOT, ".venv", "bin", "secantusd-py")
PORT = int(os.environ.get("INDEX_COSTS_PORT", "27071"))
N = int(os.environ.get("DOCS", "2000"))
ROUNDS = int(os.environ.get("ROUNDS", "2"))

SPARSE = {"sparse": True}
IDEMPOTENCY = ([("tenantKey", 1)], {"unique": True, "sparse": True})
# Before 2026-11-29: (tenant, idempotencyKey), partial.
PER_TENANT = ([("tenant", 1), ("idempotencyKey", 1)],
              {"unique": True, "partialFilterExpression": {"idempotencyKey": {"$exists": True}}})
# name -> [(keys, options)]; "service" is what src/clients/indexes.rs builds.
INDEXES = {
    "next_attempt": ([("nextAttemptAt", 1)], SPARSE),
    "idempotency_key": IDEMPOTENCY,
    "idempotency_per_tenant": PER_TENANT,
    "provider_message": ([("providerMessageId", 1)], {}),
    "recently_changed": ([("updatedAt", -1)], {}),
    "fallback_due_at": ([("fallbackDueAt", 1)], SPARSE),
    "batch": ([("batchId", 1)], SPARSE),
    "scheduled_due": ([("scheduledDueAt", 1)], SPARSE),
    "dead_letters": ([("deadLetterAt", -1)], SPARSE),
    # The sweeper's index until 2026-11-28 (replaced by next_attempt).
    "due": ([("status", 1), ("nextAttemptAt", 1)], {}),
}
CORE = ["next_attempt", "idempotency_key", "provider_message"]
SETS = {
    "service": [n for n in INDEXES
                if n not in ("scheduled_due", "idempotency_per_tenant", "batch", "due", "dead_letters")],
    "before 2026-11-30 (with batch and dead_letters)": [
        n for n in INDEXES if n not in ("scheduled_due", "idempotency_per_tenant", "due")],
    "before 2026-11-29": [n for n in INDEXES if n not in ("idempotency_key", "due")],
    "31b6486 (the issue's start)": ["due", "idempotency_per_tenant", "provider_message", "recently_changed"],
    "service less fallback": [
        n for n in INDEXES
        if n not in ("scheduled_due", "idempotency_per_tenant", "batch", "due", "dead_letters", "fallback_due_at")],
    "core": CORE,  # the sweeper, idempotency, receipts
    "core + recently_changed": CORE + ["recently_changed"],
    "id-only": [],
    "provider_message": ["provider_message"],
    "+next_attempt": ["provider_message", "next_attempt"],
    "+idempotency_key": ["provider_message", "idempotency_key"],
    "+idempotency_per_tenant": ["provider_message", "idempotency_per_tenant"],
    "+recently_changed": ["provider_message", "recently_changed"],
    "+fallback_due_at (sparse; absent)": ["provider_message", "fallback_due_at"],
    "+4 sparse (absent)": ["provider_message", "fallback_due_at", "batch", "scheduled_due", "dead_letters"],
}
CHOSEN = os.environ.get("INDEX_SETS", ",".join(SETS)).split(",")


def cpu(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start(folder):
    proc = subprocess.Popen([SERVER, "--host", "127.0.0.1", "--port", str(PORT), "--storage-path", folder],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            client = pymongo.MongoClient(f"mongodb://127.0.0.1:{PORT}/?directConnection=true",
                                         serverSelectionTimeoutMS=300)
            client.admin.command("ping")
            return proc, client
        except Exception:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("SecantusDB did not start")


def record(k, now, **fields):
    """Record `k` as the router stores it (pending, due `now`), with `fields` set over it."""
    d = {"_id": ObjectId(), "tenant": "t", "type": "sms", "from": "+15550001111",
         "to": f"+1555{k:07d}", "msg": f"load {k}", "status": "pending", "attempts": 0,
         "createdAt": now, "updatedAt": now, "notBefore": now, "nextAttemptAt": now,
         "errors": [], "requestHash": "0" * 64, "priority": "normal"}
    d.update(fields)
    return d


@contextlib.contextmanager
def secantus_with(names, db_name="index-costs"):
    """A SecantusDB of its own (temporary folder, stopped and removed at the end) with
    `communications` carrying the indexes `names`: yields (process, database, collection)."""
    folder = tempfile.mkdtemp(prefix=f"{db_name}-")
    proc, client = start(folder)
    try:
        db = client[db_name]
        col = db.get_collection("communications", write_concern=WriteConcern(w="majority", j=True))
        for name in names:
            keys, opts = INDEXES[name]
            col.create_index(keys, name=name, **opts)
        yield proc, db, col
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(folder, ignore_errors=True)


def one_set(names):
    with secantus_with(names) as (proc, db, col):
        now = datetime.datetime.now(datetime.timezone.utc)
        docs = [record(k, now) for k in range(N)]
        ids = [d["_id"] for d in docs]
        costs = {}

        def phase(name, batch, write):
            before = cpu(proc.pid)
            for a in range(0, N, batch):
                write(a, min(a + batch, N))
            costs[name] = (cpu(proc.pid) - before) / N * 1e6

        def outcome(a, b):
            # As record_outcomes sends it: one command a batch, one pipeline statement per 25.
            updates = []
            for k in range(a, b, 25):
                chunk = ids[k:min(k + 25, b)]
                at = {"$indexOfArray": [chunk, "$_id"]}
                updates.append({
                    "q": {"_id": {"$in": chunk}, "status": {"$in": ["pending", "sending"]}},
                    "u": [{"$set": {"status": "sent", "sentAt": now, "updatedAt": now, "provider": "twilio",
                                    "providerMessageId": {"$arrayElemAt": [[f"SM{i}" for i in chunk], at]},
                                    "attempts": {"$arrayElemAt": [[1] * len(chunk), at]}}},
                          {"$unset": ["claimedBy", "claimKind", "nextAttemptAt"]}],
                    "multi": True})
            db.command({"update": "communications", "ordered": False,
                        "writeConcern": {"w": "majority", "j": True}, "updates": updates})

        def receipt(a, b):
            db.command({"update": "communications", "ordered": False,
                        "writeConcern": {"w": "majority", "j": True},
                        "updates": [{"q": {"providerMessageId": {"$in": [f"SM{i}" for i in ids[a:b]]},
                                           "provider": "twilio"},
                                     "u": {"$set": {"status": "delivered", "deliveredAt": now, "updatedAt": now}},
                                     "multi": True}]})

        phase("insert", 16, lambda a, b: col.insert_many(docs[a:b], ordered=False))
        phase("claim read", 20, lambda a, b: list(col.find({"_id": {"$in": ids[a:b]}})))
        phase("outcome", 20, outcome)
        phase("receipt", 20, receipt)
        return costs


def main():
    results = {name: [] for name in CHOSEN}
    for _ in range(ROUNDS):
        for name in CHOSEN:
            results[name].append(one_set(SETS[name]))
    print(f"SecantusDB CPU µs per document ({N} documents, {ROUNDS} rounds: lowest-highest)")
    print(f"{'indexes':<36} {'insert':>10} {'claim read':>11} {'outcome':>10} {'receipt':>10} {'a message':>11}")
    for name in CHOSEN:
        runs = results[name]

        def span(values):
            return f"{min(values):.0f}-{max(values):.0f}"

        cols = [span([r[k] for r in runs]) for k in ("insert", "claim read", "outcome", "receipt")]
        total = span([sum(r.values()) for r in runs])
        print(f"{name:<36} {cols[0]:>10} {cols[1]:>11} {cols[2]:>10} {cols[3]:>10} {total:>11}", flush=True)


if __name__ == "__main__":
    main()
