// The duty console: sign in, follow the live feed (WS /api/feed), ring for critical alerts
// until someone acknowledges, and act with one tap. Plain ES module, no build step, no CDN:
// the machines that run it may have no internet (issue 8).
import {
  formatDuration, formatTime, has, language, onLanguageChange, t, toggleLanguage, translatePage,
} from "./i18n.js";

const SESSION_KEY = "eldersafe.session";
const OUTCOMES = ["handled", "false_alarm", "sent_to_hospital", "cancelled_by_resident",
  "transferred", "cleared", "deceased"];
const SEVERITY_RANK = { critical: 0, major: 1, minor: 2 };
const RESOLVED_KEEP_MS = 10 * 60 * 1000; // a resolved card stays (dimmed) this long
const LIST_PAGES = 10; // × 200 open alerts loaded at (re)connection from the start
// Reconnect soon: a console that waits long after a server restart is an alarm not heard.
// Capped at 5 s (200 consoles knocking every 5 s cost a server nothing); jittered.
const BACKOFF_MS = [250, 500, 1000, 2000, 4000, 5000];

const $ = (id) => document.getElementById(id);

/** A DOM element; children are nodes or text (never parsed as HTML: all data is text). */
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") el.className = value;
    else if (name === "dataset") Object.assign(el.dataset, value);
    else if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined && child !== false) el.append(child);
  }
  return el;
}

/** Replace an element's children, skipping absent parts (replaceChildren would print "null"). */
function fill(el, ...children) {
  el.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
}

function label(prefix, value) {
  return value && has(`${prefix}.${value}`) ? t(`${prefix}.${value}`) : String(value ?? "");
}

function newKey() {
  // crypto.randomUUID needs a secure context; a phone on the station's LAN may use http
  if (crypto.randomUUID) return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const hex = [...b].map((x) => x.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

// ---------------------------------------------------------------- session and API

let session = null; // {token, expires_at, user}
let refreshTimer = null;

class ApiError extends Error {
  constructor(status, detail) {
    super(typeof detail === "string" ? detail : JSON.stringify(detail ?? status));
    this.status = status;
  }
}

async function api(path, { method = "GET", body, idempotencyKey } = {}) {
  const headers = { Accept: "application/json" };
  if (session) headers.Authorization = `Bearer ${session.token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (idempotencyKey) headers["Idempotency-Key"] = idempotencyKey;
  const res = await fetch(path, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body), cache: "no-store",
  });
  const data = await res.json().catch(() => null);
  if (res.status === 401 && session && !path.startsWith("/api/auth/login")) {
    signOut(t("login.expired"));
  }
  if (!res.ok) throw new ApiError(res.status, data?.detail ?? res.statusText);
  return data;
}

function saveSession(answer) {
  session = { token: answer.access_token, expires_at: answer.expires_at, user: answer.user };
  sessionStorage.setItem(SESSION_KEY, JSON.stringify(session));
  scheduleRefresh();
}

function scheduleRefresh() {
  clearTimeout(refreshTimer);
  if (!session) return;
  const left = new Date(session.expires_at).getTime() - Date.now();
  // renew at two thirds of the token's life, so a night shift is never signed out mid-alarm
  const wait = Math.max(5000, left - Math.max(30000, left / 3));
  refreshTimer = setTimeout(refreshToken, wait);
}

async function refreshToken() {
  if (!session) return;
  try {
    saveSession(await api("/api/auth/refresh", { method: "POST" }));
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) return; // signed out by api()
    refreshTimer = setTimeout(refreshToken, 10000); // network: try again soon
  }
}

async function signIn(event) {
  event.preventDefault();
  unlockAudio(); // the sign-in tap is the user gesture that lets a phone sound the alarm
  const button = $("login-submit");
  button.disabled = true;
  $("login-error").textContent = "";
  try {
    const answer = await api("/api/auth/login", {
      method: "POST", body: { username: $("username").value.trim(), password: $("password").value },
    });
    $("password").value = "";
    saveSession(answer);
    startConsole();
  } catch (err) {
    $("login-error").textContent = err instanceof ApiError
      ? (err.status === 401 ? t("login.failed") : err.message) : t("login.network");
  } finally {
    button.disabled = false;
  }
}

function signOut(message = "") {
  session = null;
  sessionStorage.removeItem(SESSION_KEY);
  clearTimeout(refreshTimer);
  stopFeed();
  alerts.clear();
  for (const card of cards.values()) card.root.remove();
  cards.clear();
  updateAlarm();
  document.body.dataset.view = "login";
  $("login-error").textContent = message;
  $("whoami").textContent = "";
}

// ---------------------------------------------------------------- the alerts

const alerts = new Map(); // id → {view, seq, resolvedSeenAt}
const cards = new Map(); // id → card parts

function upsert(view, seq) {
  const current = alerts.get(view.id);
  if (current && seq < current.seq) return false; // an older state of the alert
  alerts.set(view.id, {
    view,
    seq,
    resolvedSeenAt: view.status === "resolved" ? (current?.resolvedSeenAt ?? Date.now()) : null,
  });
  return true;
}

function urgency(a, b) {
  // critical first, then those nobody has acknowledged, then the oldest; resolved last
  const ra = a.view.status === "resolved", rb = b.view.status === "resolved";
  if (ra !== rb) return ra ? 1 : -1;
  const sa = SEVERITY_RANK[a.view.severity] ?? 3, sb = SEVERITY_RANK[b.view.severity] ?? 3;
  if (sa !== sb) return sa - sb;
  const oa = a.view.status === "open", ob = b.view.status === "open";
  if (oa !== ob) return oa ? -1 : 1;
  return new Date(a.view.opened_at) - new Date(b.view.opened_at);
}

function render() {
  const list = $("alert-list");
  const entries = [...alerts.values()].sort(urgency);
  for (const [id, card] of cards) {
    if (!alerts.has(id)) {
      visibility.unobserve(card.root);
      card.root.remove();
      cards.delete(id);
    }
  }
  entries.forEach((entry, index) => {
    let card = cards.get(entry.view.id);
    if (!card) {
      card = buildCard(entry.view.id);
      cards.set(entry.view.id, card);
      visibility.observe(card.root);
    }
    fillCard(card, entry);
    if (list.children[index] !== card.root) list.insertBefore(card.root, list.children[index] ?? null);
  });
  const open = entries.filter((e) => e.view.status !== "resolved").length;
  $("open-count").textContent = open ? t("alerts.open_count", { n: open }) : "";
  $("alerts-empty").hidden = entries.length > 0;
  const waiting = entries.filter((e) => e.view.status === "open").length;
  document.title = (waiting ? `(${waiting}) ` : "") + t("app.title");
  updateAlarm();
  tick();
  queueDisplayed();
  scheduleDistrict();
}

function buildCard(id) {
  const card = { id };
  card.head = h("div", { class: "card-head" });
  card.body = h("div", { class: "card-body" });
  card.acknowledge = h("button", { type: "button", class: "act-acknowledge", onclick: () => act(id, "acknowledge") });
  card.onScene = h("button", { type: "button", class: "act-on_scene", onclick: () => act(id, "on-scene") });
  card.outcome = h("select", { class: "outcome" });
  card.resolve = h("button", { type: "button", class: "act-resolve", onclick: () => act(id, "resolve") });
  card.outcome.addEventListener("change", () => { card.resolve.disabled = !card.outcome.value || card.busy; });
  card.actions = h("div", { class: "actions" }, card.acknowledge, card.onScene,
    h("div", { class: "resolve" }, card.outcome, card.resolve));
  card.timelineList = h("ol");
  card.timelineTitle = h("summary");
  card.timeline = h("details", { class: "timeline" }, card.timelineTitle, card.timelineList);
  card.timeline.addEventListener("toggle", () => { if (card.timeline.open) loadTimeline(id); });
  card.root = h("article", { class: "alert-card", dataset: { alertId: id } },
    card.head, card.body, card.actions, card.timeline);
  return card;
}

function fillOutcomes(select) {
  const chosen = select.value;
  select.replaceChildren(h("option", { value: "" }, t("action.pick_outcome")),
    ...OUTCOMES.map((o) => h("option", { value: o }, t(`outcome.${o}`))));
  select.value = chosen;
}

function fillCard(card, entry) {
  const a = entry.view;
  card.root.className = `alert-card sev-${a.severity} st-${a.status}`;
  Object.assign(card.root.dataset, {
    status: a.status, severity: a.severity, type: a.type, site: a.site.id,
    deviceConfirmation: a.device_confirmation ?? "",
  });
  fill(card.head,
    h("span", { class: "card-type" }, label("type", a.type)),
    h("span", { class: `badge sev-${a.severity}` }, label("severity", a.severity)),
    h("span", { class: `badge st-${a.status} status` }, label("status", a.status)),
    a.count > 1 ? h("span", { class: "badge" }, t("card.repeated", { n: a.count })) : null,
    h("span", { class: "card-when" }, t("card.opened", { time: formatTime(a.opened_at) })),
  );
  fill(card.body,
    residentBlock(a),
    h("div", { class: "place" },
      h("div", {}, h("strong", {}, `${t("card.site")}: `), a.site.name,
        a.site.address ? ` · ${a.site.address}` : ""),
      h("div", {}, h("strong", {}, `${t("card.unit")}: `), a.unit.name,
        ` · ${t("card.level", { level: a.level })}`)),
    a.masked ? h("div", { class: "masked-note" }, t("card.masked")) : null,
    escalationBlock(a),
    a.acknowledged_by ? h("div", { class: "acked-by" },
      t("card.acknowledged_by", { name: actorName(a.acknowledged_by) })) : null,
    deviceBlock(a),
  );
  const done = a.status === "resolved";
  card.acknowledge.textContent = t("action.acknowledge");
  card.onScene.textContent = t("action.on_scene");
  card.resolve.textContent = t("action.resolve");
  if (card.outcome.options.length !== OUTCOMES.length + 1 || card.lang !== language()) {
    fillOutcomes(card.outcome);
    card.lang = language();
    card.timelineTitle.textContent = t("timeline.title");
    if (card.timelineData) card.timelineList.replaceChildren(...card.timelineData.map(timelineItem));
  }
  card.acknowledge.disabled = card.busy || a.status !== "open";
  card.onScene.disabled = card.busy || !(a.status === "open" || a.status === "acknowledged");
  card.outcome.disabled = card.busy || done;
  card.resolve.disabled = card.busy || done || !card.outcome.value;
  card.actions.hidden = done;
  if (card.timeline.open && card.timelineSeq !== entry.seq) loadTimeline(a.id);
}

function residentBlock(a) {
  const r = a.resident;
  if (!r) return h("div", { class: "resident" }, h("div", { class: "initials" }, "?"), t("card.no_resident"));
  const facts = [
    r.age !== null ? h("span", {}, t("card.age", { age: r.age })) : null,
    r.lives_alone ? h("span", {}, t("card.lives_alone")) : null,
    r.phone ? h("span", {}, `${t("card.phone")}: `, phoneLink(r.phone)) : null,
    r.conditions ? h("span", { class: "conditions" }, `${t("card.conditions")}: ${r.conditions}`) : null,
    r.family_contact ? h("span", {}, `${t("card.family")}: ${r.family_contact} `,
      r.family_phone ? phoneLink(r.family_phone) : "") : null,
  ];
  return h("div", { class: "resident" },
    h("div", { class: "initials", "aria-hidden": "true" }, r.initials ?? "?"),
    h("div", {}, h("div", { class: "resident-name" }, r.name ?? ""), h("div", { class: "facts" }, facts)));
}

function phoneLink(phone) {
  // a masked number (138****5678) cannot be called: shown as text
  return phone.includes("*") ? phone : h("a", { href: `tel:${phone}` }, phone);
}

function escalationBlock(a) {
  if (!a.next_escalation_at || a.status === "resolved") return null;
  const what = a.status === "open" ? "card.next_escalation" : "card.next_step";
  return h("div", { class: "escalation" }, h("span", {}, t(what)),
    h("span", { class: "countdown", dataset: { deadline: a.next_escalation_at } }));
}

function deviceBlock(a) {
  if (a.device_confirmation) {
    return h("div", { class: "device", dataset: { state: a.device_confirmation } },
      a.device_confirmation === "executed" ? t("device.executed")
        : a.device_confirmation === "unreachable" ? t("device.unreachable")
          : t("device.refused", { outcome: a.device_confirmation }));
  }
  if (a.device_id && a.status !== "open" && a.status !== "resolved") {
    return h("div", { class: "device", dataset: { state: "waiting" } }, t("device.waiting"));
  }
  return null;
}

function actorName(actor) {
  if (session && actor === `staff:${session.user.id}`) return session.user.name;
  return actor.startsWith("staff:") ? actor.slice(6) : actor;
}

function tick() {
  const now = Date.now();
  for (const el of document.querySelectorAll(".countdown[data-deadline]")) {
    const left = (new Date(el.dataset.deadline).getTime() - now) / 1000;
    el.textContent = left > 0 ? formatDuration(left) : t("card.escalating");
    el.classList.toggle("due", left <= 30);
  }
  let pruned = false;
  for (const [id, entry] of alerts) {
    if (entry.resolvedSeenAt && now - entry.resolvedSeenAt > RESOLVED_KEEP_MS) {
      alerts.delete(id);
      pruned = true;
    }
  }
  if (pruned) render();
}

// ---------------------------------------------------------------- one-tap actions

function toast(message) {
  const el = $("action-message");
  el.textContent = message;
  el.hidden = !message;
  clearTimeout(toast.timer);
  if (message) toast.timer = setTimeout(() => { el.hidden = true; }, 6000);
}

async function act(id, action) {
  const card = cards.get(id);
  if (!card || card.busy) return;
  const body = action === "resolve" ? { outcome: card.outcome.value, note: "" } : undefined;
  if (action === "resolve" && !body.outcome) return;
  unlockAudio();
  card.busy = true;
  render();
  const key = newKey(); // one key per tap: a retry of this tap is the same acknowledgement
  try {
    let answer;
    try {
      answer = await api(`/api/alerts/${id}/${action}`, { method: "POST", body, idempotencyKey: key });
    } catch (err) {
      if (err instanceof ApiError) throw err;
      answer = await api(`/api/alerts/${id}/${action}`, { method: "POST", body, idempotencyKey: key });
    }
    const entry = alerts.get(id);
    if (entry) alerts.set(id, { ...entry, view: answer, resolvedSeenAt: answer.status === "resolved" ? Date.now() : null });
    toast("");
  } catch (err) {
    if (err instanceof ApiError && err.status === 409) toast(t("action.conflict"));
    else if (err instanceof ApiError && err.status === 404) {
      alerts.delete(id);
      toast(t("action.gone"));
    } else toast(t("action.failed", { detail: err.message }));
  } finally {
    card.busy = false;
    render();
  }
}

async function loadTimeline(id) {
  const card = cards.get(id);
  const entry = alerts.get(id);
  if (!card || !entry) return;
  card.timelineSeq = entry.seq;
  if (!card.timelineList.children.length) {
    card.timelineList.replaceChildren(h("li", {}, t("timeline.loading")));
  }
  try {
    const detail = await api(`/api/alerts/${id}`);
    card.timelineData = detail.timeline;
    card.timelineList.replaceChildren(...detail.timeline.map(timelineItem));
  } catch {
    card.timelineList.replaceChildren(h("li", {}, t("timeline.failed")));
  }
}

function timelineItem(e) {
  let who;
  if (e.actor_name) who = e.actor_name;
  else if (e.actor.startsWith("device:")) who = t("actor.device");
  else if (e.actor.startsWith("system")) who = t("actor.system");
  else who = e.actor;
  const d = e.detail ?? {};
  const extra = [];
  if ((d.person || d.target) && e.action !== "noted") extra.push(t("timeline.to", { who: d.person ? actorName(d.person) : d.target }));
  if (e.action === "escalated" && d.level !== undefined) extra.push(t("timeline.level", { level: d.level }));
  if (e.action === "resolved" && d.outcome) extra.push(label("outcome", d.outcome));
  if (d.result === "device_confirmed") extra.push(t("timeline.device_confirmed"));
  if (e.action === "noted" && d.by === "shown on the console") extra.push(t("timeline.seen"));
  else if (d.note) extra.push(String(d.note));
  return h("li", { dataset: { action: e.action, actor: e.actor } },
    h("time", { datetime: e.time }, formatTime(e.time)),
    h("span", { class: "actor" }, who),
    h("span", { class: "what" }, label("audit", e.action)),
    e.channel ? h("span", { class: "channel" }, `(${label("channel", e.channel)})`) : null,
    extra.length ? h("span", { class: "detail" }, extra.join(" · ")) : null);
}

// ---------------------------------------------------------------- "displayed" receipts

// An alert counts as shown when its card is on screen in a visible page: only then may the
// engine stop falling back to messaging for this person.
const onScreen = new Set();
const reported = new Map(); // id → seq reported
let displayedTimer = null;

const visibility = new IntersectionObserver((observed) => {
  for (const o of observed) {
    const id = o.target.dataset.alertId;
    // most of the card, or enough of a tall one (timeline open on a phone) to read it
    if (o.isIntersecting && (o.intersectionRatio >= 0.4 || o.intersectionRect.height >= 160)) {
      onScreen.add(id);
    } else onScreen.delete(id);
  }
  queueDisplayed();
}, { threshold: [0, 0.1, 0.2, 0.3, 0.4] });

function queueDisplayed() {
  if (displayedTimer === null) displayedTimer = setTimeout(flushDisplayed, 250);
}

function flushDisplayed() {
  displayedTimer = null;
  if (document.visibilityState !== "visible" || !feed.ready) return;
  const ids = [];
  for (const id of onScreen) {
    const entry = alerts.get(id);
    if (!entry || entry.view.status === "resolved") continue;
    if (reported.has(id) && reported.get(id) >= entry.seq) continue;
    ids.push(id);
  }
  if (!ids.length) return;
  for (let i = 0; i < ids.length; i += 100) {
    if (!send({ type: "displayed", alert_ids: ids.slice(i, i + 100) })) return;
  }
  for (const id of ids) reported.set(id, alerts.get(id).seq);
}

document.addEventListener("visibilitychange", queueDisplayed);

// ---------------------------------------------------------------- the live feed

const feed = { ws: null, position: null, attempt: 0, timer: null, ready: false, loading: false, buffer: [] };

function setFeedState(state) {
  document.body.dataset.feed = state;
  $("feed-state").textContent = t(`conn.${state}`);
}

function send(message) {
  if (!feed.ws || feed.ws.readyState !== WebSocket.OPEN) return false;
  feed.ws.send(JSON.stringify(message));
  return true;
}

function startFeed() {
  clearTimeout(feed.timer);
  if (!session) return;
  const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/api/feed`;
  const ws = new WebSocket(url);
  const fromStart = feed.position === null;
  feed.ws = ws;
  feed.ready = false;
  setFeedState("connecting");
  // the token goes in the first message, never in the URL (URLs end up in logs)
  ws.onopen = () => ws.send(JSON.stringify({ type: "auth", token: session.token, after: feed.position }));
  ws.onmessage = (event) => {
    if (feed.ws !== ws) return;
    let message;
    try {
      message = JSON.parse(event.data);
    } catch {
      return;
    }
    onFeedMessage(ws, message, fromStart);
  };
  ws.onclose = (event) => {
    if (feed.ws !== ws) return;
    feed.ws = null;
    feed.ready = false;
    if (!session) return;
    setFeedState("offline");
    // 4410: the server does not know our position; 4400: it refused it — reload the list
    if (event.code === 4410 || event.code === 4400) {
      feed.position = null;
      feed.attempt = 0; // the server is up: come back at once
    }
    if (event.code === 4401) {
      // the token was refused: renew it (or sign out), then come back
      refreshToken().then(() => { if (session) scheduleReconnect(); });
      return;
    }
    scheduleReconnect();
  };
}

function scheduleReconnect() {
  clearTimeout(feed.timer);
  const base = BACKOFF_MS[Math.min(feed.attempt, BACKOFF_MS.length - 1)];
  feed.attempt += 1;
  feed.timer = setTimeout(startFeed, base / 2 + Math.random() * base / 2);
}

function stopFeed() {
  clearTimeout(feed.timer);
  const ws = feed.ws;
  feed.ws = null;
  feed.ready = false;
  feed.position = null;
  feed.buffer = [];
  reported.clear();
  if (ws) ws.close(1000, "signed out");
  setFeedState("offline");
}

function onFeedMessage(ws, message, fromStart) {
  switch (message?.type) {
    case "ready":
      feed.attempt = 0;
      feed.ready = true;
      if (typeof message.position === "number") feed.position = message.position;
      setFeedState("live");
      if (fromStart) loadList();
      queueDisplayed();
      break;
    case "changes":
      // one frame per batch; each element is one change, applied in order
      if (!Array.isArray(message.changes)) break;
      for (const change of message.changes) onChange(change);
      break;
    case "reset":
      // the server does not know our position: start over from the list
      feed.position = null;
      break;
    case "ping":
      if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: "pong" }));
      break;
    case "error":
      console.warn("feed:", message.detail);
      break;
    default:
      break;
  }
}

function onChange(message) {
  if (message?.type !== "change") return;
  if (typeof message.position === "number") feed.position = message.position;
  if (!message.alert || typeof message.seq !== "number") return;
  if (feed.loading) feed.buffer.push(message);
  else applyChange(message);
}

function applyChange(message) {
  const wasNew = !alerts.has(message.alert_id);
  if (!upsert(message.alert, message.seq)) return;
  if (wasNew && message.alert.severity === "critical" && message.alert.status === "open") {
    navigator.vibrate?.([400, 200, 400, 200, 400]);
  }
  render();
}

async function loadList() {
  // Changes that arrive meanwhile are held and applied on top of the list (highest seq wins).
  feed.loading = true;
  feed.buffer = [];
  try {
    const items = [];
    let cursor = null;
    for (let page = 0; page < LIST_PAGES; page += 1) {
      const query = new URLSearchParams([["status", "open"], ["status", "acknowledged"],
        ["status", "on_scene"], ["limit", "200"]]);
      if (cursor) query.set("cursor", cursor);
      const answer = await api(`/api/alerts?${query}`);
      items.push(...answer.items);
      cursor = answer.next_cursor;
      if (!cursor) break;
    }
    const resolvedShown = [...alerts.values()].filter((e) => e.view.status === "resolved");
    alerts.clear();
    for (const entry of resolvedShown) alerts.set(entry.view.id, entry);
    for (const view of items) upsert(view, 0);
  } catch (err) {
    console.warn("alert list:", err.message);
  } finally {
    feed.loading = false;
    const held = feed.buffer;
    feed.buffer = [];
    for (const message of held) upsert(message.alert, message.seq);
    render();
  }
}

// ---------------------------------------------------------------- the alarm

// A two-tone siren from one oscillator whose pitch an LFO swings between 660 and 880 Hz,
// all on the audio thread (no timers to be throttled in a background tab). It sounds while
// any critical alert is still open, whoever acknowledges it.
const alarm = { ctx: null, osc: null, lfo: null, gain: null };

function unlockAudio() {
  const AudioContextClass = window.AudioContext || window.webkitAudioContext;
  if (!AudioContextClass) return;
  if (!alarm.ctx) {
    alarm.ctx = new AudioContextClass();
    alarm.ctx.addEventListener("statechange", updateAlarm);
  }
  if (alarm.ctx.state === "suspended") alarm.ctx.resume().then(updateAlarm, () => {});
}

function alarmNeeded() {
  for (const entry of alerts.values()) {
    if (entry.view.severity === "critical" && entry.view.status === "open") return true;
  }
  return false;
}

function startTone() {
  if (alarm.osc) return;
  const ctx = alarm.ctx;
  const osc = ctx.createOscillator();
  const lfo = ctx.createOscillator();
  const depth = ctx.createGain();
  const gain = ctx.createGain();
  osc.type = "square";
  osc.frequency.value = 770;
  lfo.type = "square";
  lfo.frequency.value = 1.5;
  depth.gain.value = 110;
  gain.gain.value = 0.15;
  lfo.connect(depth).connect(osc.frequency);
  osc.connect(gain).connect(ctx.destination);
  osc.start();
  lfo.start();
  Object.assign(alarm, { osc, lfo, gain });
}

function stopTone() {
  if (!alarm.osc) return;
  alarm.osc.stop();
  alarm.lfo.stop();
  alarm.gain.disconnect();
  Object.assign(alarm, { osc: null, lfo: null, gain: null });
}

function updateAlarm() {
  const needed = session !== null && alarmNeeded();
  if (needed) {
    if (!alarm.ctx) unlockAudio(); // allowed to run without a tap only where policy lets it
    else if (alarm.ctx.state === "suspended") alarm.ctx.resume().catch(() => {});
  }
  const running = alarm.ctx?.state === "running";
  if (needed && running) startTone();
  else stopTone();
  const state = alarm.osc && running ? "sounding" : needed ? "blocked" : "off";
  document.body.dataset.alarm = state;
  const banner = $("sound-banner");
  banner.hidden = state === "off";
  banner.textContent = state === "sounding" ? t("sound.sounding") : t("sound.blocked");
}

// ---------------------------------------------------------------- the district view

let districtTimer = null;
let districtDue = 0;

function showsDistrict() {
  return session && ["street", "bureau"].includes(session.user.organisation_kind);
}

function scheduleDistrict() {
  if (!showsDistrict()) return;
  // at most one reload every 3 s however busy the feed is, and every 30 s regardless
  const wait = Math.max(0, districtDue - Date.now());
  if (districtTimer === null) districtTimer = setTimeout(loadDistrict, wait);
}

async function loadDistrict() {
  districtTimer = null;
  districtDue = Date.now() + 3000;
  if (!showsDistrict()) return;
  try {
    renderDistrict(await api("/api/stats/units?hours=24"));
  } catch (err) {
    console.warn("district:", err.message);
  }
  clearTimeout(districtTimer);
  districtTimer = setTimeout(loadDistrict, 30000);
}

function ratioCell(within, total, p50, target) {
  if (!total) return [h("td", {}, t("district.none")), h("td", {}, t("district.none"))];
  const late = p50 !== null && p50 > target;
  return [
    h("td", { class: within === total ? "ok" : "late" }, `${within}/${total}`),
    h("td", { class: late ? "late" : "ok" }, p50 === null ? t("district.none") : formatDuration(p50)),
  ];
}

function renderDistrict(stats) {
  district.last = stats;
  $("district").hidden = false;
  const units = stats.units.filter((u) => !["street", "bureau"].includes(u.kind));
  const head = h("tr", {}, ...["district.unit", "district.open", "district.unacknowledged"]
    .map((k) => h("th", {}, t(k))), h("th", {}, t("district.raised", { hours: stats.hours })),
  ...["district.ack", "district.ack_p50", "district.scene", "district.scene_p50"].map((k) => h("th", {}, t(k))));
  const rows = units.map((u) => h("tr", { dataset: { unit: u.id } },
    h("td", {}, u.name),
    h("td", { class: "open" }, String(u.open)),
    h("td", { class: u.unacknowledged ? "late" : "" }, String(u.unacknowledged)),
    h("td", {}, String(u.raised)),
    ...ratioCell(u.acknowledged_in_target, u.acknowledged, u.ack_p50_s, stats.ack_target_s),
    ...ratioCell(u.on_scene_in_target, u.on_scene, u.scene_p50_s, stats.scene_target_s)));
  $("district-table").replaceChildren(h("thead", {}, head), h("tbody", {}, rows));
}

const district = { last: null };

// ---------------------------------------------------------------- start

function startConsole() {
  document.body.dataset.view = "console";
  const u = session.user;
  $("whoami").textContent = `${u.name} · ${u.organisation_id}`;
  $("district").hidden = !showsDistrict();
  feed.position = null;
  startFeed();
  if (showsDistrict()) loadDistrict();
  render();
}

function restoreSession() {
  try {
    const saved = JSON.parse(sessionStorage.getItem(SESSION_KEY) ?? "null");
    if (saved && new Date(saved.expires_at).getTime() > Date.now() + 5000) return saved;
  } catch {
    // unreadable: sign in again
  }
  return null;
}

function init() {
  translatePage();
  setFeedState("offline");
  $("login-form").addEventListener("submit", signIn);
  $("lang-toggle").addEventListener("click", toggleLanguage);
  $("logout").addEventListener("click", () => signOut());
  $("sound-banner").addEventListener("click", unlockAudio);
  // any tap after a reload unlocks the sound a phone would otherwise block
  document.addEventListener("pointerdown", unlockAudio, { passive: true });
  onLanguageChange(() => {
    setFeedState(document.body.dataset.feed);
    for (const card of cards.values()) card.lang = null;
    render();
    if (district.last) renderDistrict(district.last);
  });
  setInterval(tick, 1000);
  session = restoreSession();
  if (session) {
    scheduleRefresh();
    startConsole();
  }
}

init();
