"""What the Reconciler's pass (every `reconciler.interval_ms`, 60 s) costs SecantusDB as
records change: the time of the pass's read of MongoDB with N records changed within its
window, for the read before 2026-11-29 (the whole window, `updatedAt` from `lookback_ms`
to `settle_ms` ago, newest first, limit 1,000: SecantusDB reads every record of the range
a query names, then sorts and cuts, so the pass read all N) and for the read now (the
window walked back from its newest end in slices, each read newest first with the limit
still wanted, until 1,000 records are found or the window is done).

    scripts/stack.sh up && .venv/bin/python scripts/reconcile-pass.py

Uses a scratch database it drops afterwards.
"""
import datetime
import os
import time

import pymongo

URL = os.environ.get("MONGODB_URL", "mongodb://127.0.0.1:27027/?directConnection=true")
LIMIT = 1000
now = datetime.datetime.now(datetime.timezone.utc)
frm = now - datetime.timedelta(minutes=10)
to = now - datetime.timedelta(seconds=30)
client = pymongo.MongoClient(URL)
db = client["reconcile-pass-scratch"]


def fill(col, n):
    # n records changed at an even rate over the window (as under steady load).
    span = (to - frm).total_seconds()
    docs = [{"status": "delivered", "type": "sms", "msg": "x" * 100,
             "updatedAt": frm + datetime.timedelta(seconds=span * (i + 0.5) / n)} for i in range(n)]
    for i in range(0, len(docs), 5000):
        col.insert_many(docs[i: i + 5000])


def whole(col):
    return list(col.find({"updatedAt": {"$gte": frm, "$lte": to}}).sort("updatedAt", -1).limit(LIMIT))


def sliced(col):
    # The service's walk (src/clients/reconcile.rs, actors::walk::resized): the first
    # slice 1 s, each next one sized to hold the records still wanted at the last one's
    # density (twice as wide after an empty one; at most doubled, at least quartered),
    # between 100 ms and 60 s.
    got, hi, width, reads = [], to, datetime.timedelta(seconds=1), 0
    while len(got) < LIMIT and hi > frm:
        lo = max(frm, hi - width)
        page = list(col.find({"updatedAt": {"$gte": lo, "$lte": hi} if lo == frm else {"$gt": lo, "$lte": hi}})
                    .sort("updatedAt", -1).limit(LIMIT - len(got)))
        reads += 1
        got += page
        want = LIMIT - len(got)
        secs = width.total_seconds()
        scaled = secs * 2 if not page else secs * want / len(page)
        secs = min(max(scaled, secs / 4), secs * 2)
        width, hi = datetime.timedelta(seconds=min(max(secs, 0.1), 60)), lo
    return got, reads


for n in (1_000, 10_000, 50_000):
    db.drop_collection("c")
    col = db["c"]
    col.create_index([("updatedAt", -1)], name="recently_changed")
    fill(col, n)
    t = time.perf_counter()
    a = whole(col)
    t_whole = time.perf_counter() - t
    t = time.perf_counter()
    b, reads = sliced(col)
    t_sliced = time.perf_counter() - t
    assert [d["_id"] for d in a] == [d["_id"] for d in b], "the same records, in the same order"
    print(f"{n:>6} changed: whole window {t_whole * 1000:7.0f} ms, sliced {t_sliced * 1000:6.0f} ms "
          f"({reads} reads), {len(a)} records")
client.drop_database("reconcile-pass-scratch")
