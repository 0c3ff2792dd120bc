"""What the local MongoDB stand-in can do at most, with the service's indexes and document
shape and nothing else running: the ceiling the Performance section compares against.

    scripts/stack.sh up && .venv/bin/python scripts/mongo-ceiling.py

Prints documents/s for: insert_many (the RouterActor's group commit), the claim read
(find by _id $in), and the outcome write (one pipeline update per batch, as
record_outcomes sends it). Uses a scratch database it drops afterwards.
"""
import datetime
import os
import time

import pymongo
from bson import ObjectId
from pymongo.write_concern import WriteConcern

URL = os.environ.get("MONGODB_URL", "mongodb://127.0.0.1:27027/?directConnection=true")
N = int(os.environ.get("CEILING_DOCS", "4096"))

client = pymongo.MongoClient(URL)
db = client["ceiling-scratch"]
col = db.get_collection("communications", write_concern=WriteConcern(j=True))
col.drop()
col.create_index([("nextAttemptAt", 1)], name="next_attempt", sparse=True)
col.create_index([("providerMessageId", 1)], name="provider_message")
col.create_index([("tenantKey", 1)], name="idempotency_key", unique=True, sparse=True)
now = datetime.datetime.now(datetime.timezone.utc)
docs = [
    {"_id": ObjectId(), "tenant": "t", "type": "sms", "from": "+15550001111",
     "to": f"+1555{k:07d}", "msg": f"load {k}", "status": "pending", "attempts": 0,
     "createdAt": now, "updatedAt": now, "notBefore": now, "nextAttemptAt": now,
     "errors": [], "requestHash": "0" * 64}
    for k in range(N)
]
ids = [d["_id"] for d in docs]


def timed(name, batch, fn):
    start = time.time()
    for k in range(0, N, batch):
        fn(k, k + batch)
    took = time.time() - start
    print(f"{name:<42} batch {batch:>4}: {N / took:7.0f} docs/s")


for batch in (32, 256):
    col.delete_many({})
    timed("insert_many (j:true)", batch,
          lambda a, b: col.insert_many(docs[a:b], ordered=False))
timed("find _id $in (claim read)", 100, lambda a, b: list(col.find({"_id": {"$in": ids[a:b]}})))


def outcome(a, b):
    # As record_outcomes sends it: one command a batch, one statement per 25 records.
    updates = []
    for k in range(a, b, 25):
        chunk = ids[k:min(k + 25, b)]
        at = {"$indexOfArray": [chunk, "$_id"]}
        updates.append({
            "q": {"_id": {"$in": chunk}, "status": {"$in": ["pending", "sending"]}},
            "u": [{"$set": {"status": "sent", "sentAt": now, "updatedAt": now,
                            "providerMessageId": {"$arrayElemAt": [[f"SM{i}" for i in chunk], at]},
                            "attempts": {"$arrayElemAt": [[1] * len(chunk), at]}}},
                  {"$unset": ["nextAttemptAt"]}],
            "multi": True,
        })
    db.command({"update": "communications", "ordered": False, "writeConcern": {"j": True},
                "updates": updates})


timed("pipeline update (outcome write)", 100, outcome)
client.drop_database("ceiling-scratch")
