"""What the ReceiptActor's count of `parked_receipts` costs SecantusDB as receipts pile up
there (receipts whose records never come stay parked for good): `count_documents({})` (the
count the look makes), `estimated_document_count()`, and the look's due read (`nextTryAt`
up to now, none due) with N parked.

    scripts/stack.sh up && .venv/bin/python scripts/parked-count.py

Uses a scratch database it drops afterwards.
"""
import datetime
import os
import time

import pymongo

URL = os.environ.get("MONGODB_URL", "mongodb://127.0.0.1:27027/?directConnection=true")
client = pymongo.MongoClient(URL)
db = client["parked-count-scratch"]
db.drop_collection("p")
col = db["p"]
col.create_index([("nextTryAt", 1)])
now = datetime.datetime.now(datetime.timezone.utc)
for n in (1_000, 20_000):
    col.delete_many({})
    docs = [{"_id": f"twilio:SM{i}:delivered", "nextTryAt": now + datetime.timedelta(seconds=60 * (i % 60 + 1)),
             "tries": 5} for i in range(n)]
    for i in range(0, n, 5000):
        col.insert_many(docs[i: i + 5000])
    for name, f in (("count_documents({})", lambda: col.count_documents({})),
                    ("estimated_document_count()", col.estimated_document_count),
                    ("the due read", lambda: len(list(col.find({"nextTryAt": {"$lte": now}})
                                                     .sort("nextTryAt", 1).limit(100))))):
        t = time.perf_counter()
        r = f()
        print(f"{n:>6} parked: {name:28s} {(time.perf_counter() - t) * 1000:6.1f} ms ({r})")
client.drop_database("parked-count-scratch")
