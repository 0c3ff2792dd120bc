"""What a message's `communication-logs` documents cost Elasticsearch (osmem): its CPU time
and the bulk bytes per message for the three log documents of a delivered message
(`queued`, `sent`, `delivered`), in five layouts, for an SMS-sized body and an
email-sized one (about 900 bytes, under the 1 KB a log event carries):

- "full": the body, `createdAt` and `priority` in all three, `cursorSeq` a `long` (the
  seed's model, and this service before 2026-11-29);
- "slim": those three fields in the `queued` document only (actors/src/log_indexer.rs,
  CONTENT_FIELDS), `cursorSeq` still a `long`;
- "text": slim, and `cursorSeq` zero-padded text in a `keyword` (actors/src/event_fanout.rs,
  cursor_seq_text);
- "dates": text, and no `createdAt` in any log document (the `queued` one's was its
  `timestamp` to a few milliseconds);
- "now": dates, and no `attempt` where it is 0 (the `queued` document), what the
  LogIndexer writes now.

It also writes one `communications` document a message (the record's newest version, in the
service's mapping) in two layouts: "record+updatedAt" (the earlier layout: `updatedAt`
beside `timestamp`, always equal) and "record" (now: `timestamp` alone; search answers
`updatedAt` from it).

Each run is an osmem of its own (started here, stopped at the end), so the CPU is that
process's alone (/proc/<pid>/stat); the documents go in bulks of 900, as the LogIndexer's
`max_docs` allows, into the service's mapping.

    .venv/bin/python scripts/es-doc-costs.py
    MESSAGES=18000 ROUNDS=3 .venv/bin/python scripts/es-doc-costs.py

osmem's cost of a document grows with the index it goes into, so compare within one run
and at the same MESSAGES only.
"""
import glob
import json
import os
import subprocess
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVER = glob.glob(os.path.join(ROOT, ".venv", "lib", "python3*", "site-packages", "osmem_server", "bin",
                                "osmem-server"))[0]
PORT = int(os.environ.get("ES_DOC_COSTS_PORT", "9271"))
N = int(os.environ.get("MESSAGES", "6000"))
ROUNDS = int(os.environ.get("ROUNDS", "2"))
PER_BULK = 300  # messages: 900 log documents a bulk

KEYWORDS = ["tenant", "service", "status", "from", "to", "communicationId", "type", "provider",
            "providerMessageId", "batchId", "cursor", "priority"]
# As src/clients/elastic.rs `logs_mapping` before the cursor's number was text.
MAPPING = {"mappings": {"properties": {
    **{k: {"type": "keyword"} for k in KEYWORDS},
    "msg": {"type": "text"}, "error": {"type": "text"}, "timestamp": {"type": "date"},
    "createdAt": {"type": "date"}, "attempt": {"type": "integer"}, "cursorSeq": {"type": "long"}}}}
CONTENT_FIELDS = ("msg", "createdAt", "priority")
WORDS = ("Hello Ada, your order has shipped and will arrive on Tuesday between nine and noon. "
         "Track it at the link below or reply to this email with any question about delivery, "
         "returns or invoices.").split()


def body(kind, i):
    if kind == "sms":
        return f"Your verification code is {i % 999999:06d}. It expires in ten minutes."
    return " ".join(WORDS[(i + k) % len(WORDS)] for k in range(150))


LAYOUTS = {"full": "body in all three, cursorSeq long", "slim": "body in queued, cursorSeq long",
           "text": "body in queued, cursorSeq text", "dates": "text, no createdAt",
           "now": "dates, no attempt 0",
           "record+updatedAt": "communications, updatedAt", "record": "communications, no updatedAt"}
LAYOUTS = {k: v for k, v in LAYOUTS.items() if k in os.environ.get("LAYOUTS", ",".join(LAYOUTS)).split(",")}
# As src/clients/elastic.rs `communications_mapping`.
RECORD_MAPPING = {"mappings": {"properties": {
    **{k: {"type": "keyword"} for k in ["tenant", "communicationId", "from", "to", "status", "type", "stream",
                                         "provider", "providerMessageId", "batchId", "priority"]},
    "msg": {"type": "text"}, "lastError": {"type": "text"}, "timestamp": {"type": "date"},
    "createdAt": {"type": "date"}, "updatedAt": {"type": "date"}, "attempts": {"type": "integer"}}}}


def mapping(layout):
    if layout.startswith("record"):
        return RECORD_MAPPING
    m = json.loads(json.dumps(MAPPING))
    if layout in ("text", "dates", "now"):
        m["mappings"]["properties"]["cursorSeq"] = {"type": "keyword"}
    return m


def log_doc(kind, i, status, layout):
    """The event's log document as the LogIndexer writes it in `layout` (LogEvent's fields)."""
    d = {"tenant": "default", "service": "router" if status == "queued" else kind, "status": status,
         "from": "+15550001111" if kind == "sms" else "shop@example.org",
         "to": f"+1555{i % 10**7:07d}" if kind == "sms" else f"ada{i}@example.org",
         "msg": body(kind, i), "communicationId": f"{i:024x}", "timestamp": "2026-11-29T12:00:00.123Z",
         "type": kind, "attempt": 0 if status == "queued" else 1, "createdAt": "2026-11-29T12:00:00.000Z",
         "cursor": f"{1795896097993 + i}-0", "priority": "normal", "cursorSeq": (1795896097993 + i) * 1024}
    if status != "queued":
        d["provider"] = "twilio" if kind == "sms" else "smtp"
        d["providerMessageId"] = f"SM{i:032x}"
        if layout != "full":
            for k in CONTENT_FIELDS:
                del d[k]
    if layout in ("text", "dates", "now"):
        d["cursorSeq"] = f"{d['cursorSeq']:020d}"
    if layout in ("dates", "now"):
        d.pop("createdAt", None)
    if layout == "now" and d["attempt"] == 0:
        del d["attempt"]
    return d


def record_doc(kind, i, layout):
    """The record's `communications` document, delivered, as the LogIndexer writes it."""
    d = {"tenant": "default", "communicationId": f"{i:024x}",
         "from": "+15550001111" if kind == "sms" else "shop@example.org",
         "to": f"+1555{i % 10**7:07d}" if kind == "sms" else f"ada{i}@example.org",
         "msg": body(kind, i), "type": kind, "stream": f"{kind}_stream",
         "timestamp": "2026-11-29T12:00:01.456Z", "createdAt": "2026-11-29T12:00:00.000Z",
         "status": "delivered", "updatedAt": "2026-11-29T12:00:01.456Z", "attempts": 1,
         "provider": "twilio" if kind == "sms" else "smtp", "providerMessageId": f"SM{i:032x}",
         "priority": "normal"}
    if layout == "record":
        del d["updatedAt"]
    return d


def bulk_lines(kind, i, layout):
    if layout.startswith("record"):
        return [json.dumps({"index": {"_index": "communications", "_id": f"{i:024x}"}}),
                json.dumps(record_doc(kind, i, layout))]
    lines = []
    for status in ("queued", "sent", "delivered"):
        lines.append(json.dumps({"create": {"_index": "communication-logs", "_id": f"{i:024x}:{status}"}}))
        lines.append(json.dumps(log_doc(kind, i, status, layout)))
    return lines


def cpu(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def call(method, path, data=None, ctype="application/json"):
    req = urllib.request.Request(f"http://127.0.0.1:{PORT}{path}", data=data, method=method,
                                 headers={"Content-Type": ctype})
    with urllib.request.urlopen(req) as res:
        return res.read()


def one_run(kind, layout):
    """(osmem CPU µs, bulk bytes) per message."""
    proc = subprocess.Popen([SERVER, "-addr", f"127.0.0.1:{PORT}", "-no-stdin-watch"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                call("GET", "/")
                break
            except OSError:
                time.sleep(0.1)
        index = "communications" if layout.startswith("record") else "communication-logs"
        call("PUT", f"/{index}", json.dumps(mapping(layout)).encode())
        bodies = []
        for b in range(N // PER_BULK):
            lines = []
            for i in range(b * PER_BULK, (b + 1) * PER_BULK):
                lines.extend(bulk_lines(kind, i, layout))
            bodies.append(("\n".join(lines) + "\n").encode())
        before = cpu(proc.pid)
        for data in bodies:
            answer = json.loads(call("POST", "/_bulk", data, "application/x-ndjson"))
            if answer.get("errors"):
                raise SystemExit(f"osmem refused documents: {str(answer)[:300]}")
        used = cpu(proc.pid) - before
        return used / N * 1e6, sum(map(len, bodies)) / N
    finally:
        proc.terminate()
        proc.wait()


def main():
    runs = {}
    for _ in range(ROUNDS):
        for kind in ("sms", "email"):
            for layout in LAYOUTS:
                runs.setdefault((kind, layout), []).append(one_run(kind, layout))
    print(f"osmem per message: its 3 log documents, or its one record document ({N} messages, "
          f"{ROUNDS} rounds: lowest-highest)")
    print(f"{'body':<7} {'layout':<38} {'CPU µs':>12} {'bulk bytes':>11}")
    for (kind, layout), values in runs.items():
        us = [v[0] for v in values]
        what = f"{layout}: {LAYOUTS[layout]}"
        print(f"{kind:<7} {what:<38} {min(us):>5.0f}-{max(us):<6.0f} {values[0][1]:>11.0f}", flush=True)


if __name__ == "__main__":
    main()
