"""What the OutboxSweeper's look (every second) costs SecantusDB as sent records pile up:
the time of one look with 100 records due among N records already sent, for the look the
service makes (a range read of `nextAttemptAt` in the sparse index `next_attempt`, status
and channel as residual clauses, lanes and the acknowledged point checked by the service)
and for the look before 2026-11-29 (`status` `$in` and a top-level `$or` of the lanes on
the compound index `due`: SecantusDB plans no index for a filter with a top-level `$`
operator, so each look read the whole collection).

    scripts/stack.sh up && .venv/bin/python scripts/sweep-due.py

Uses a scratch database it drops afterwards.
"""
import datetime
import os
import time

import pymongo

URL = os.environ.get("MONGODB_URL", "mongodb://127.0.0.1:27027/?directConnection=true")
LOOKS = 5
now = datetime.datetime.now(datetime.timezone.utc)
acked = now - datetime.timedelta(seconds=5)
client = pymongo.MongoClient(URL)
db = client["sweep-due-scratch"]


def fill(col, sent):
    docs = [{"status": "delivered", "type": "sms", "priority": "normal", "createdAt": now,
             "queuedAt": now, "msg": "x" * 100} for _ in range(sent)]
    docs += [{"status": "pending", "type": "sms", "priority": "normal", "msg": "x" * 100,
              "createdAt": now - datetime.timedelta(minutes=1), "queuedAt": now - datetime.timedelta(minutes=1),
              "nextAttemptAt": now - datetime.timedelta(seconds=i)} for i in range(100)]
    for i in range(0, len(docs), 5000):
        col.insert_many(docs[i: i + 5000])


def scope(channel, priority):
    p = {"$in": [None, "normal"]} if priority == "normal" else priority
    return {"type": channel, "priority": p, "$or": [
        {"queuedAt": {"$lte": acked}}, {"queuedAt": None, "createdAt": {"$lte": acked}}]}


LOOKS_BY_SHAPE = [
    ("before: due, $in + $or of 9 lanes", [("status", 1), ("nextAttemptAt", 1)], {},
     {"status": {"$in": ["pending", "sending"]}, "nextAttemptAt": {"$lte": now},
      "$or": [scope(c, p) for c in ("sms", "email", "whatsapp") for p in ("high", "normal", "bulk")]}),
    ("now: next_attempt range, residual clauses", [("nextAttemptAt", 1)], {"sparse": True},
     {"nextAttemptAt": {"$lte": now}, "status": {"$in": ["pending", "sending"]},
      "type": {"$in": ["sms", "email", "whatsapp"]}, "createdAt": {"$lte": acked}}),
]

print(f"{'look':<44} {'sent records':>12} {'ms a look':>10}")
for sent in (1_000, 10_000, 50_000):
    for name, keys, opts, query in LOOKS_BY_SHAPE:
        col = db["communications"]
        col.drop()
        col.create_index(keys, name="look", **opts)
        fill(col, sent)
        assert len(list(col.find(query).sort("nextAttemptAt", 1).limit(500))) == 100
        start = time.perf_counter()
        for _ in range(LOOKS):
            list(col.find(query).sort("nextAttemptAt", 1).limit(500))
        ms = (time.perf_counter() - start) / LOOKS * 1000
        print(f"{name:<44} {sent:>12,} {ms:>10.1f}", flush=True)
client.drop_database("sweep-due-scratch")
