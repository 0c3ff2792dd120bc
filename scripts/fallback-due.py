"""What the FallbackActor's look costs: one due look with 100 fallbacks due, N settled ones
and 1,000 not yet due among 10,000 records that asked for none. Before: one filter (not
settled, and `fallbackAt` passed or the record failed, oldest first, at most 500) over a
partial index on `fallbackAt`, or a sparse one. Now (the service's): one range read of
`fallbackDueAt`, which only unsettled fallbacks carry, in a sparse index (the due ones and
the failed ones picked from what it reads).

    scripts/stack.sh up && .venv/bin/python scripts/fallback-due.py

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
db = client["fallback-due-scratch"]
QUERY = {
    "fallbackAt": {"$exists": True},
    "fallbackSettledAt": {"$exists": False},
    "$or": [{"fallbackAt": {"$lte": now}}, {"status": "failed"}],
}


def fill(col, settled):
    sec = datetime.timedelta(seconds=1)
    docs = [{"status": "sent", "msg": "x" * 100} for _ in range(10_000)]
    docs += [
        {"status": "delivered", "fallbackAt": now - i * sec, "fallbackSettledAt": now, "msg": "x" * 100}
        for i in range(settled)
    ]
    later = [now + (i + 60) * sec for i in range(1_000)]
    docs += [{"status": "sent", "fallbackAt": t, "fallbackDueAt": t, "msg": "x"} for t in later]
    due = [now - i * sec for i in range(100)]
    docs += [{"status": "sent", "fallbackAt": t, "fallbackDueAt": t, "msg": "x"} for t in due]
    for i in range(0, len(docs), 5000):
        col.insert_many(docs[i : i + 5000])


LAST = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.timezone.utc)
RANGE = {"fallbackDueAt": {"$lte": LAST}}


def look(col, query, field, limit):
    def once():
        found = col.find(query, {"_id": 1, "status": 1, field: 1}).sort(field, 1).limit(limit)
        return [d for d in found if d[field].replace(tzinfo=datetime.timezone.utc) <= now or d["status"] == "failed"]

    assert len(once()) == 100
    start = time.perf_counter()
    for _ in range(LOOKS):
        once()
    plan = col.find(query).sort(field, 1).limit(limit).explain()["queryPlanner"]["winningPlan"]
    stages = []
    while plan:
        stages.append(plan.get("stage"))
        plan = plan.get("inputStage")
    return (time.perf_counter() - start) / LOOKS * 1000, ">".join(stages)


print(f"{'index':<40} {'settled':>8} {'ms a look':>10}  plan")
for settled in (1_000, 10_000, 50_000):
    for name, key, opts, query, limit in [
        ("partial fallbackAt (before)", "fallbackAt",
         {"partialFilterExpression": {"fallbackAt": {"$exists": True}}}, QUERY, 500),
        ("sparse fallbackAt, same filter", "fallbackAt", {"sparse": True}, QUERY, 500),
        ("sparse fallbackDueAt, a range (now)", "fallbackDueAt", {"sparse": True}, RANGE, 10_000),
    ]:
        col = db["communications"]
        col.drop()
        col.create_index([(key, 1)], name="fallback_due", **opts)
        fill(col, settled)
        ms, plan = look(col, query, key, limit)
        print(f"{name:<40} {settled:>8,} {ms:>10.1f}  {plan}")
client.drop_database("fallback-due-scratch")
