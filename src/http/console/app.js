// The comm-aggregator console: plain JavaScript, no framework, no build step. Every value
// from the API is put on the page as text (textContent), never as markup: message bodies
// are user data. The API key lives in sessionStorage only and goes in the Authorization
// header of this origin's API calls.
"use strict";

const KEY = "comm-aggregator.apiKey";
const POLL_MS = 2000;
const FINAL = ["delivered", "read", "failed", "undelivered", "canceled", "suppressed"];

let stopPage = null; // stops the current page's live updates

function $(sel) { return document.querySelector(sel); }

/** An element with attributes and children; strings become text nodes. */
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null) continue;
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function key() { return sessionStorage.getItem(KEY); }

function notice(text) { $("#notice").textContent = text || ""; }

/** An API call with the key; a 401 signs out. Answers {status, body}. */
async function api(path, options) {
  const opts = Object.assign({ headers: {} }, options || {});
  opts.headers = Object.assign({ Authorization: "Bearer " + key() }, opts.headers);
  const res = await fetch(path, opts);
  if (res.status === 401) { signOut("The key was refused."); throw new Error("unauthorized"); }
  let body = null;
  try { body = await res.json(); } catch (_) { body = null; }
  return { status: res.status, body };
}

function signOut(why) {
  sessionStorage.removeItem(KEY);
  if (stopPage) { stopPage(); stopPage = null; }
  $("#view").replaceChildren();
  $("#nav").hidden = true;
  $("#signin-view").hidden = false;
  $("#signin-error").textContent = why || "";
  notice("");
}

async function signIn(event) {
  event.preventDefault();
  const k = $("#key").value.trim();
  if (!k) return;
  sessionStorage.setItem(KEY, k);
  const probe = await fetch("/api/v1/communications?size=1", { headers: { Authorization: "Bearer " + k } });
  if (probe.status === 401) { signOut("The key was refused."); return; }
  $("#key").value = "";
  if (!location.hash || location.hash === "#/") location.hash = "#/messages";
  route();
}

function fmtTime(t) { return t ? String(t).replace("T", " ").replace(/\.\d+Z$|Z$/, " UTC") : ""; }

function statusCell(status) {
  return el("td", { class: "status status-" + status, "data-status": status }, status);
}

// ---- Messages: search filters, counts, live statuses ----------------------------------

const FILTERS = ["type", "status", "to", "batchId", "since", "until", "q"];

function filterForm(values, onSubmit) {
  const select = (name, options) => el("label", {}, name,
    el("select", { name, id: "f-" + name },
      options.map((o) => { const opt = el("option", { value: o }, o || "any"); if (values[name] === o) opt.selected = true; return opt; })));
  const input = (name, placeholder) => el("label", {}, name,
    el("input", { name, id: "f-" + name, placeholder, value: values[name] || "" }));
  return el("form", { class: "filters", id: "filters", onsubmit: onSubmit },
    select("type", ["", "sms", "email", "whatsapp"]),
    select("status", ["", "scheduled", "pending", "sending", "sent", "delivered", "read", "failed", "undelivered", "canceled", "suppressed"]),
    input("to", "+15557654321"), input("batchId", "24 hex digits"),
    input("since", "2026-11-28T00:00:00Z"), input("until", "RFC 3339"), input("q", "words in the message"),
    el("button", { type: "submit", id: "f-apply" }, "Search"));
}

function messagesPage(params) {
  const values = {};
  for (const f of FILTERS) if (params.get(f)) values[f] = params.get(f);
  const form = filterForm(values, (e) => {
    e.preventDefault();
    const q = new URLSearchParams();
    for (const f of FILTERS) { const v = form.elements[f].value.trim(); if (v) q.set(f, v); }
    location.hash = "#/messages" + (q.toString() ? "?" + q : "");
  });
  const counts = el("div", { class: "counts", id: "counts" });
  const body = el("tbody", { id: "messages" });
  const table = el("table", {}, el("thead", {}, el("tr", {},
    ["Created", "Type", "To", "Message", "Status", "Provider", "Attempts"].map((h) => el("th", {}, h)))), body);
  const total = el("p", { class: "muted", id: "total" });
  $("#view").replaceChildren(el("h2", {}, "Messages"), form, counts, total, table);

  let known = new Map(); // id -> row
  const seen = new Map(); // id -> the newest status event of it
  let timer = null;
  let stopped = false;
  let again = null;
  let tries = 0;
  const query = new URLSearchParams(values);
  query.set("size", "50");

  async function refresh() {
    const { status, body: answer } = await api("/api/v1/communications?" + query);
    if (stopped) return;
    if (status !== 200) { notice((answer && answer.error && answer.error.message) || "Search failed (" + status + ")"); return; }
    total.textContent = answer.total + " message(s)";
    counts.replaceChildren(
      ...Object.entries(answer.counts.byStatus || {}).map(([s, n]) => el("span", { class: "status-" + s, "data-count": s }, s + ": " + n)),
      ...Object.entries(answer.counts.byType || {}).map(([t, n]) => el("span", { "data-count": t }, t + ": " + n)));
    const rows = answer.items.map((m) => {
      const row = el("tr", { class: "clickable", "data-id": m.id, onclick: () => { location.hash = "#/message/" + m.id; } },
        el("td", {}, fmtTime(m.createdAt)), el("td", {}, m.type), el("td", {}, m.to),
        el("td", { class: "msg" }, m.msg), statusCell(m.status), el("td", {}, m.provider || ""),
        el("td", {}, m.attempts));
      // Search lags the stream: an event newer than the hit wins.
      const ev = seen.get(m.id);
      if (ev && Date.parse(ev.at) > Date.parse(m.updatedAt || 0)) applyEvent(row, ev);
      return row;
    });
    known = new Map(rows.map((r) => [r.getAttribute("data-id"), r]));
    body.replaceChildren(...rows);
    // Events of messages search does not have yet: look again shortly, a few times.
    const missing = [...seen.keys()].some((id) => !known.has(id));
    if (missing && tries < 10) { tries += 1; refreshSoon(1000); }
  }

  function applyEvent(row, ev) {
    const cells = row.children;
    cells[4].replaceWith(statusCell(ev.status));
    if (ev.provider) cells[5].textContent = ev.provider;
    if (ev.attempt !== undefined && ev.attempt !== null) cells[6].textContent = ev.attempt;
  }

  /** A status event: the row's status, then a fresh search (counts, new messages). */
  function onStatus(ev) {
    const prev = seen.get(ev.id);
    if (!prev || Date.parse(ev.at) >= Date.parse(prev.at)) seen.set(ev.id, ev);
    const row = known.get(ev.id);
    if (row) applyEvent(row, seen.get(ev.id));
    else tries = 0;
    refreshSoon(300);
  }
  function refreshSoon(ms) {
    if (again) return;
    again = setTimeout(() => { again = null; refresh(); }, ms);
  }

  refresh();
  const live = follow(query, onStatus, () => {
    // No status stream on this service: poll the search.
    $("#live").textContent = "live: polling every 2 s";
    timer = setInterval(refresh, POLL_MS);
  });
  return () => { stopped = true; live(); if (timer) clearInterval(timer); if (again) clearTimeout(again); };
}

/**
 * Follow `GET /api/v1/events` (server-sent events, read with fetch so the key goes in a
 * header), reconnecting with Last-Event-ID. `fallback` runs if the service has no stream
 * (404) or refuses the query (4xx). Answers a function that stops it.
 */
function follow(query, onStatus, fallback) {
  const ctrl = new AbortController();
  let lastId = null;
  let stopped = false;
  const q = new URLSearchParams();
  for (const f of ["type", "batchId"]) if (query.get(f)) q.set(f, query.get(f));
  async function connect() {
    while (!stopped) {
      try {
        const headers = { Authorization: "Bearer " + key(), Accept: "text/event-stream" };
        if (lastId) headers["Last-Event-ID"] = lastId;
        const res = await fetch("/api/v1/events" + (q.toString() ? "?" + q : ""), { headers, signal: ctrl.signal });
        if (res.status === 401) { signOut("The key was refused."); return; }
        // No stream on this service (404), or none for this query: poll instead.
        if (res.status >= 400 && res.status < 500 && res.status !== 429) { fallback(); return; }
        if (!res.ok || !res.body) throw new Error("status " + res.status);
        $("#live").textContent = "live: status stream";
        await readEvents(res.body, (id, type, data) => {
          if (id) lastId = id;
          if (type === "status") { try { onStatus(JSON.parse(data)); } catch (_) { /* not ours */ } }
        });
      } catch (e) {
        if (stopped) return;
      }
      await new Promise((r) => setTimeout(r, 1000));
    }
  }
  connect();
  return () => { stopped = true; ctrl.abort(); };
}

/** Parse a text/event-stream body: each event's id, type and data, as they come. */
async function readEvents(stream, onEvent) {
  const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  let id = null, type = "message", data = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value;
    let nl;
    while ((nl = buf.search(/\r?\n/)) >= 0) {
      const line = buf.slice(0, nl);
      buf = buf.slice(nl + (buf[nl] === "\r" ? 2 : 1));
      if (line === "") {
        if (data.length) onEvent(id, type, data.join("\n"));
        type = "message"; data = [];
        continue;
      }
      if (line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      const val = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
      if (field === "id") id = val;
      else if (field === "event") type = val;
      else if (field === "data") data.push(val);
    }
  }
}

// ---- One message: the record and its timeline -----------------------------------------

const RECORD_SHOWN = ["id", "type", "status", "from", "to", "subject", "msg", "provider", "providerMessageId",
  "attempts", "createdAt", "sentAt", "deliveredAt", "readAt", "failedAt", "lastError", "batchId", "sendAt",
  "deadLetterAt", "deadLetterReason", "replays", "replayedAt"];

function messagePage(id) {
  const record = el("dl", { class: "record", id: "record" });
  const actions = el("div", { id: "actions" });
  const timeline = el("tbody", { id: "timeline" });
  const attempts = el("tbody", { id: "attempts" });
  $("#view").replaceChildren(
    el("p", {}, el("a", { href: "#/messages" }, "← Messages")),
    el("h2", {}, "Message ", el("code", {}, id)), record, actions,
    el("h3", {}, "Timeline"),
    el("table", {}, el("thead", {}, el("tr", {}, ["When", "Event", "Attempt", "Provider", "By", "Provider id", "Error"].map((h) => el("th", {}, h)))), timeline),
    el("h3", {}, "Failed attempts"),
    el("table", {}, el("thead", {}, el("tr", {}, ["Attempt", "When", "Provider", "Code", "Message"].map((h) => el("th", {}, h)))), attempts));
  let stopped = false;
  async function refresh() {
    const [r, t] = await Promise.all([api("/api/v1/communication/" + id), api("/api/v1/communication/" + id + "/events")]);
    if (stopped) return;
    if (r.status !== 200) { record.replaceChildren(el("dd", { class: "error" }, (r.body && r.body.error && r.body.error.message) || "Not found")); return; }
    const m = r.body;
    record.replaceChildren(...RECORD_SHOWN.filter((k) => m[k] !== undefined && m[k] !== null).flatMap((k) =>
      [el("dt", {}, k), k === "status" ? el("dd", { class: "status status-" + m.status, id: "record-status" }, m.status) : el("dd", { "data-field": k }, String(m[k]))]));
    actions.replaceChildren(...(m.deadLetterAt ? [replayButton(id, refresh)] : []));
    attempts.replaceChildren(...(m.errors || []).map((e) => el("tr", {},
      el("td", {}, e.attempt), el("td", {}, fmtTime(e.at)), el("td", {}, e.provider || ""), el("td", {}, e.code || ""), el("td", {}, e.message))));
    if (t.status === 200) {
      timeline.replaceChildren(...t.body.events.map((e) => el("tr", { "data-event": e.status },
        el("td", {}, fmtTime(e.timestamp)), statusCell(e.status), el("td", {}, e.attempt), el("td", {}, e.provider || ""),
        el("td", {}, e.service || ""), el("td", {}, e.providerMessageId || ""), el("td", {}, e.error || ""))));
    }
  }
  refresh();
  const timer = setInterval(refresh, POLL_MS);
  return () => { stopped = true; clearInterval(timer); };
}

function replayButton(id, after) {
  return el("button", { type: "button", class: "replay", "data-id": id, onclick: async (e) => {
    e.stopPropagation();
    e.target.disabled = true;
    const { status, body } = await api("/api/v1/dead-letters/" + id + "/replay", { method: "POST" });
    notice(status === 202 ? "Replayed " + id + ": it is pending again." : (body && body.error ? body.error.message : "Replay failed (" + status + ")"));
    after();
  } }, "Replay");
}

// ---- Providers ------------------------------------------------------------------------

function providersPage() {
  const body = el("tbody", { id: "providers" });
  $("#view").replaceChildren(el("h2", {}, "Providers"),
    el("table", {}, el("thead", {}, el("tr", {}, ["Channel", "Provider", "Position", "Weight", "Strategy", "Breaker", "Error rate", "Calls", "Failures", "Rate limit"].map((h) => el("th", {}, h)))), body));
  let stopped = false;
  async function refresh() {
    const { status, body: answer } = await api("/api/v1/providers");
    if (stopped || status !== 200) return;
    body.replaceChildren(...answer.providers.map((p) => {
      const b = p.breaker || {};
      const rl = p.rateLimit || {};
      const breaker = b.state + (b.retryInMs ? " (retry in " + b.retryInMs + " ms)" : "");
      const limit = rl.ratePerSec !== undefined ? rl.ratePerSec + "/s, burst " + rl.burst + ", tokens " + Number(rl.tokens).toFixed(1) + (rl.pausedForMs ? ", paused " + rl.pausedForMs + " ms" : "") : "";
      return el("tr", { "data-provider": p.channel + ":" + p.provider },
        el("td", {}, p.channel), el("td", {}, p.provider), el("td", {}, p.position), el("td", {}, p.weight), el("td", {}, p.strategy),
        el("td", { class: "state-" + b.state }, breaker), el("td", {}, p.recentErrorRate), el("td", {}, p.calls), el("td", {}, p.failures), el("td", {}, limit));
    }));
  }
  refresh();
  const timer = setInterval(refresh, POLL_MS);
  return () => { stopped = true; clearInterval(timer); };
}

// ---- Dead letters ---------------------------------------------------------------------

function deadLettersPage(params) {
  const page = Math.max(1, parseInt(params.get("page") || "1", 10) || 1);
  const body = el("tbody", { id: "dead-letters" });
  const pager = el("p", { class: "muted", id: "pager" });
  $("#view").replaceChildren(el("h2", {}, "Dead letters"),
    el("p", { class: "muted" }, "Messages the service failed for good. Replay puts one back on its stream with a fresh attempt budget; it is sent once."),
    el("table", {}, el("thead", {}, el("tr", {}, ["Dead since", "Reason", "Type", "To", "Message", "Attempts", "Last error", ""].map((h) => el("th", {}, h)))), body), pager);
  async function refresh() {
    const { status, body: answer } = await api("/api/v1/dead-letters?size=20&page=" + page);
    if (status !== 200) { notice("Dead letters unavailable (" + status + ")"); return; }
    body.replaceChildren(...answer.items.map((m) => el("tr", { "data-id": m.id },
      el("td", {}, fmtTime(m.deadLetterAt)), el("td", {}, m.deadLetterReason), el("td", {}, m.type), el("td", {}, m.to),
      el("td", { class: "msg" }, el("a", { href: "#/message/" + m.id }, m.msg)), el("td", {}, m.attempts), el("td", {}, m.lastError || ""),
      el("td", {}, replayButton(m.id, refresh)))));
    if (!answer.items.length) body.replaceChildren(el("tr", { id: "no-dead-letters" }, el("td", { colspan: "8", class: "muted" }, "No dead letters.")));
    pager.replaceChildren(
      page > 1 ? el("a", { href: "#/dead-letters?page=" + (page - 1) }, "← newer") : "",
      " page " + page + " ",
      answer.nextPage ? el("a", { href: "#/dead-letters?page=" + answer.nextPage }, "older →") : "");
  }
  refresh();
  return () => {};
}

// ---- Routing --------------------------------------------------------------------------

function route() {
  if (stopPage) { stopPage(); stopPage = null; }
  notice("");
  $("#live").textContent = "";
  if (!key()) { signOut(); return; }
  $("#signin-view").hidden = true;
  $("#nav").hidden = false;
  const hash = location.hash.replace(/^#/, "") || "/messages";
  const [path, qs] = hash.split("?");
  const params = new URLSearchParams(qs || "");
  const parts = path.split("/").filter(Boolean);
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.getAttribute("href") === "#/" + parts[0]);
  if (parts[0] === "message" && /^[0-9a-fA-F]{24}$/.test(parts[1] || "")) stopPage = messagePage(parts[1]);
  else if (parts[0] === "providers") stopPage = providersPage();
  else if (parts[0] === "dead-letters") stopPage = deadLettersPage(params);
  else stopPage = messagesPage(params);
}

document.addEventListener("DOMContentLoaded", () => {
  $("#signin").addEventListener("submit", signIn);
  $("#signout").addEventListener("click", () => signOut());
  window.addEventListener("hashchange", route);
  route();
});
