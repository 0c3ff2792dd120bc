"""What the FallbackActor's look costs: one due look (the service's filter: fallbacks not
settled whose `fallbackAt` passed or whose record failed, oldest first, at most 500) with
100 fallbacks due, N settled ones and 1,000 not yet due among 10,000 records that asked for
none, for a partial index on `fallbackAt` (the index before this change) and a sparse one
(the service's now; SecantusDB does not plan with partial indexes).

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
    docs += [{"status": "sent", "fallbackAt": now + (i + 60) * sec, "msg": "x"} for i in range(1_000)]
    docs += [{"status": "sent", "fallbackAt": now - i * sec, "msg": "x"} for i in range(100)]
    for i in range(0, len(docs), 5000):
        col.insert_many(docs[i : i + 5000])


def look(col):
    def once():
        return list(col.find(QUERY, {"_id": 1}).sort("fallbackAt", 1).limit(500))

    assert len(once()) == 100
    start = time.perf_counter()
    for _ in range(LOOKS):
        once()
    plan = col.find(QUERY).sort("fallbackAt", 1).limit(500).explain()["queryPlanner"]["winningPlan"]
    stages = []
    while plan:
        stages.append(plan.get("stage"))
        plan = plan.get("inputStage")
    return (time.perf_counter() - start) / LOOKS * 1000, ">".join(stages)


print(f"{'index':<32} {'settled':>8} {'ms a look':>10}  plan")
for settled in (1_000, 10_000, 50_000):
    for name, opts in [
        ("partial fallbackAt (before)", {"partialFilterExpression": {"fallbackAt": {"$exists": True}}}),
        ("sparse fallbackAt (now)", {"sparse": True}),
    ]:
        col = db["communications"]
        col.drop()
        col.create_index([("fallbackAt", 1)], name="fallback_due", **opts)
        fill(col, settled)
        ms, plan = look(col)
        print(f"{name:<32} {settled:>8,} {ms:>10.1f}  {plan}")
client.drop_database("fallback-due-scratch")
