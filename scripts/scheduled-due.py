"""What the SchedulerActor's look costs as scheduled records pile up: the time of one due
look (find the due ones, oldest first, at most a batch of 500) with 100 records due among
N scheduled ahead and 10,000 records that are not scheduled, for the service's look (a
range of `nextAttemptAt`, where a `scheduled` record keeps its `sendAt`, in the sparse
index `next_attempt`, with `status` and `sendAt` as residual clauses) and, for comparison,
the sparse index on `scheduledDueAt` it read before 2026-11-29 and a partial index on
`sendAt` (which SecantusDB does not plan with). The plan printed is `explain`'s, which does
not show SecantusDB's use of an index for one clause of a filter with residual clauses
(src/clients/sweep.rs): the time is the measure.

    scripts/stack.sh up && .venv/bin/python scripts/scheduled-due.py

Uses a scratch database it drops afterwards.
"""
import datetime
import os
import time

import pymongo

URL = os.environ.get("MONGODB_URL", "mongodb://127.0.0.1:27027/?directConnection=true")
LOOKS = 10
now = datetime.datetime.now(datetime.timezone.utc)
client = pymongo.MongoClient(URL)
db = client["scheduled-due-scratch"]


def fill(col, field, ahead):
    docs = [{"status": "sent", "msg": "x" * 100} for _ in range(10_000)]
    def at(t):
        return {field: t, "sendAt": t}

    docs += [
        {"status": "scheduled", **at(now + datetime.timedelta(days=1, seconds=i)), "msg": "x" * 100}
        for i in range(ahead)
    ]
    docs += [{"status": "scheduled", **at(now - datetime.timedelta(seconds=i))} for i in range(100)]
    for i in range(0, len(docs), 5000):
        col.insert_many(docs[i : i + 5000])


def look(col, query, field):
    def once():
        return list(col.find(query, {"_id": 1}).sort(field, 1).limit(500))

    assert len(once()) == 100
    start = time.perf_counter()
    for _ in range(LOOKS):
        once()
    plan = col.find(query).sort(field, 1).limit(500).explain()["queryPlanner"]["winningPlan"]
    stages = []
    while plan:
        stages.append(plan.get("stage"))
        plan = plan.get("inputStage")
    return (time.perf_counter() - start) / LOOKS * 1000, ">".join(stages)


print(f"{'index':<40} {'scheduled ahead':>15} {'ms a look':>10}  plan")
for ahead in (1_000, 10_000, 50_000):
    for name, field, opts, query in [
        ("next_attempt range (the service's)", "nextAttemptAt", {"sparse": True},
         {"nextAttemptAt": {"$lte": now}, "status": "scheduled", "sendAt": {"$lte": now}}),
        ("sparse scheduledDueAt (before)", "scheduledDueAt", {"sparse": True},
         {"scheduledDueAt": {"$lte": now}}),
        ("partial status+sendAt", "sendAt", {"partialFilterExpression": {"sendAt": {"$exists": True}}},
         {"status": "scheduled", "sendAt": {"$lte": now}}),
    ]:
        col = db["communications"]
        col.drop()
        keys = [(field, 1)] if opts.get("sparse") else [("status", 1), (field, 1)]
        col.create_index(keys, name="scheduled_due", **opts)
        fill(col, field, ahead)
        ms, plan = look(col, query, field)
        print(f"{name:<40} {ahead:>15,} {ms:>10.1f}  {plan}")
client.drop_database("scheduled-due-scratch")
