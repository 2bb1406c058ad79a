// The live page: one snapshot per second from /api/events, the operator's controls on the API.
// Plain DOM, no framework and no build step. Text from the streams is only ever set as textContent.
"use strict";

const TOKEN_KEY = "quantum-trader-token";
const STALE_MS = 4000; // no snapshot for this long: the page says so
const EQUITY_EVERY_MS = 30000; // and soon after the results or the journal move

// The pipeline as drawn: streams (by their short name in the snapshot) and the stages between them.
const MAIN_ROW = [
  ["stream", "candle", "candles"],
  ["stage", "ai-engine", "ai-engine"],
  ["stream", "decision", "decisions"],
  ["stage", "router", "router"],
  ["stream", "intent", "intents"],
  ["stage", "execution", "execution"],
  ["stream", "result", "results"],
  ["stage", "journal", "journal"],
];
// Below the main row: what branches off it, with the column it sits under and how it connects.
const SIDE_ROW = [
  ["stage", "protect", "protect", 2, "candles → protect → decisions (stop-loss, take-profit)"],
  ["stream", "rejected", "rejections", 4, "from router (INVALID, DUPLICATE_SKIP) → journal"],
  ["stream", "dead_letter", "dead letters", 6, "entries set aside by any stage → journal"],
  ["stream", "risk_state", "trading-state changes", 7, "operator and breakers → journal"],
  ["stream", "result_legacy", "results (legacy copy)", 8, "dual write of results"],
];

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (name === "class") node.className = value;
    else node.setAttribute(name, value);
  }
  for (const child of children) node.append(child);
  return node;
}

// ---- numbers and times ---------------------------------------------------------------------------

const INT = new Intl.NumberFormat("en-US");

function fmtInt(value) {
  return value === null || value === undefined ? "–" : INT.format(value);
}

function fmtRate(value) {
  if (value === null || value === undefined) return "–";
  return value >= 100 ? INT.format(Math.round(value)) : value.toFixed(1);
}

// An exact decimal string, grouped by thousands, at most 8 places, without trailing zeros.
function fmtDec(text) {
  if (text === null || text === undefined || text === "") return "–";
  const match = /^(-?)(\d+)(?:\.(\d+))?$/.exec(String(text));
  if (!match) return String(text);
  const [, sign, whole, frac = ""] = match;
  const places = frac.slice(0, 8).replace(/0+$/, "");
  const grouped = whole.replace(/\B(?=(\d{3})+(?!\d))/g, ",");
  const shown = places ? `${grouped}.${places}` : grouped;
  return shown === "0" ? "0" : sign + shown;
}

function sign(text) {
  const value = Number.parseFloat(text);
  return value > 0 ? "up" : value < 0 ? "down" : "";
}

// "2025-01-02T03:04:05.678Z" -> "03:04:05" (UTC), the full stamp as the cell's title.
function fmtTime(iso) {
  const match = /T(\d\d:\d\d:\d\d)/.exec(iso || "");
  return match ? match[1] : iso || "";
}

// ---- the pipeline --------------------------------------------------------------------------------

function figure(id, label) {
  return [el("dt", {}, label), el("dd", { id, class: "num" }, "–")];
}

function streamNode(key, title, note) {
  const box = el(
    "div",
    { class: "node stream", id: `stream-${key}` },
    el("div", { class: "title" }, title),
    el("div", { class: "sub", id: `stream-${key}-name` }, ""),
    el(
      "dl",
      {},
      ...figure(`stream-${key}-length`, "length"),
      ...figure(`stream-${key}-rate`, "rate /s"),
      ...figure(`stream-${key}-lag`, "lag"),
      ...figure(`stream-${key}-pending`, "pending"),
    ),
  );
  if (note) box.append(el("div", { class: "note" }, note));
  return box;
}

function stageNode(name, title, note) {
  const box = el(
    "div",
    { class: "node stage", id: `stage-${name}` },
    el("div", { class: "title" }, title),
    el(
      "dl",
      {},
      ...figure(`stage-${name}-lag`, "lag"),
      ...figure(`stage-${name}-pending`, "pending"),
      ...figure(`stage-${name}-consumers`, "consumers"),
    ),
  );
  if (note) box.append(el("div", { class: "note" }, note));
  return box;
}

function drawPipeline() {
  const host = $("pipeline");
  MAIN_ROW.forEach(([kind, key, title], index) => {
    const node = kind === "stream" ? streamNode(key, title) : stageNode(key, title);
    node.style.gridColumn = String(index + 1);
    node.style.gridRow = "1";
    if (index < MAIN_ROW.length - 1) node.classList.add("flows");
    host.append(node);
  });
  for (const [kind, key, title, column, note] of SIDE_ROW) {
    const node = kind === "stream" ? streamNode(key, title, note) : stageNode(key, title, note);
    node.style.gridColumn = String(column);
    node.style.gridRow = "2";
    node.classList.add("side");
    if (key === "result_legacy") node.hidden = true; // shown when the snapshot has it
    host.append(node);
  }
}

function setText(id, text) {
  const node = $(id);
  if (node && node.textContent !== text) node.textContent = text;
}

function renderStreams(snap) {
  for (const stream of snap.streams) {
    const box = $(`stream-${stream.key}`);
    if (!box) continue;
    box.hidden = false;
    box.classList.toggle("missing", !stream.exists);
    box.classList.toggle("behind", (stream.lag || 0) > 0);
    // The key's last part names it well enough on the card; the whole key is the tooltip.
    setText(`stream-${stream.key}-name`, stream.name.slice(stream.name.lastIndexOf(":") + 1));
    $(`stream-${stream.key}-name`).title = stream.name;
    setText(`stream-${stream.key}-length`, fmtInt(stream.length));
    setText(`stream-${stream.key}-rate`, fmtRate(stream.rate));
    const exact = stream.groups.every((group) => group.lag_exact);
    setText(`stream-${stream.key}-lag`, stream.lag === null ? "–" : (exact ? "" : "≥") + fmtInt(stream.lag));
    setText(`stream-${stream.key}-pending`, fmtInt(stream.pending));
    box.title = stream.groups.length
      ? stream.groups
          .map((g) => `${g.name}: lag ${g.lag}, pending ${g.pending}, ${g.consumers} consumer(s)`)
          .join("\n")
      : stream.exists
        ? "no consumer group"
        : "the stream does not exist yet";
  }
  for (const [, name] of [...MAIN_ROW, ...SIDE_ROW].filter(([kind]) => kind === "stage")) {
    const figures = snap.stages[name];
    const box = $(`stage-${name}`);
    box.classList.toggle("missing", !figures);
    box.classList.toggle("behind", Boolean(figures && figures.lag > 0));
    box.classList.toggle("idle", Boolean(figures && figures.consumers === 0));
    setText(`stage-${name}-lag`, figures ? fmtInt(figures.lag) : "–");
    setText(`stage-${name}-pending`, figures ? fmtInt(figures.pending) : "–");
    setText(`stage-${name}-consumers`, figures ? fmtInt(figures.consumers) : "–");
    box.title = figures ? "" : "no consumer group yet: the stage has not run on this server";
  }
}

// ---- state, kill switch, trades ------------------------------------------------------------------

function renderControls(snap) {
  const kill = snap.kill;
  setText("kill-state", kill.on ? "ON" : "OFF");
  $("kill-card").dataset.state = kill.on ? "on" : "off";
  setText(
    "kill-detail",
    kill.value === null
      ? "quantum:kill is not set: nothing trades until it is turned off"
      : kill.on
        ? `trading halted (quantum:kill = ${kill.value})`
        : "trading allowed (quantum:kill = 0)",
  );

  const state = snap.trading_state;
  setText("trading-state", state.state);
  $("state-card").dataset.state = state.state.toLowerCase();
  const parts = [state.reason, state.detail].filter(Boolean).join(": ");
  const who = [state.by && `by ${state.by}`, state.at && `at ${fmtTime(state.at)}`].filter(Boolean).join(" ");
  const until = state.until ? `, until ${state.until}` : "";
  setText("trading-detail", [parts, who].filter(Boolean).join(" — ") + until);

  const trades = snap.trades;
  setText("trades-today", fmtInt(trades.today));
  setText("trades-limit", fmtInt(trades.limit));
  setText("trades-day", trades.day);
  const share = trades.limit > 0 ? Math.min(100, (100 * trades.today) / trades.limit) : 100;
  const fill = $("trades-bar-fill");
  fill.style.width = `${share}%`;
  fill.className = share >= 100 ? "full" : share >= 80 ? "high" : "";
  $("trades-bar").setAttribute("aria-valuenow", share.toFixed(1));

  setText("mode", `${snap.mode} · ${snap.exchange}`);
  $("mode").dataset.mode = snap.mode;
}

// ---- tables --------------------------------------------------------------------------------------

function cell(text, attrs) {
  return el("td", attrs || {}, text === undefined || text === null ? "" : String(text));
}

function fillTable(id, rows, makeRow, empty, columns) {
  const body = document.querySelector(`#${id} tbody`);
  const fresh = rows.length
    ? rows.map(makeRow)
    : [el("tr", { class: "empty" }, el("td", { colspan: String(columns) }, empty))];
  body.replaceChildren(...fresh);
}

function resultRow(row) {
  return el(
    "tr",
    { "data-id": row.id, class: `status-${row.status.toLowerCase()}` },
    cell(fmtTime(row.at), { title: row.at }),
    cell(row.status, { class: "status" }),
    cell(row.reason),
    cell(row.symbol),
    cell(row.side),
    cell(fmtDec(row.qty), { class: "num" }),
    cell(fmtDec(row.filled_qty), { class: "num" }),
    cell(fmtDec(row.avg_price), { class: "num" }),
    cell(row.detail, { class: "text", title: row.detail }),
  );
}

function rejectionRow(row) {
  return el(
    "tr",
    { "data-id": row.id },
    cell(fmtTime(row.at), { title: row.at }),
    cell(row.reason, { class: "status" }),
    cell(row.symbol),
    cell(row.side),
    cell(fmtDec(row.qty), { class: "num" }),
    cell(row.detail, { class: "text", title: row.detail }),
  );
}

function positionRow(p) {
  const fees = Object.entries(p.fees)
    .map(([asset, amount]) => `${fmtDec(amount)} ${asset}`)
    .join(", ");
  return el(
    "tr",
    { "data-symbol": p.symbol },
    cell(p.symbol),
    cell(fmtDec(p.qty), { class: "num" }),
    cell(fmtDec(p.avg_price), { class: "num" }),
    cell(fmtDec(p.mark), { class: "num" }),
    cell(fmtDec(p.value), { class: "num" }),
    cell(fmtDec(p.unrealised), { class: `num ${sign(p.unrealised)}` }),
    cell(fmtDec(p.realised), { class: `num ${sign(p.realised)}` }),
    cell(fees),
  );
}

function renderTables(snap) {
  fillTable("results", snap.results, resultRow, "no results yet", 9);
  fillTable("rejections", snap.rejections, rejectionRow, "no rejections", 6);
  fillTable("positions", snap.positions, positionRow, "the book holds nothing", 8);
  const pnl = Object.entries(snap.pnl)
    .map(([quote, sums]) => `${quote}: realised ${fmtDec(sums.realised)}, unrealised ${fmtDec(sums.unrealised)}`)
    .join(" · ");
  setText("pnl", pnl ? `PnL (average cost) — ${pnl}` : "");
}

// ---- the live feed -------------------------------------------------------------------------------

let lastSnapshot = 0;
let source = null;

function setConn(kind, text) {
  const conn = $("conn");
  conn.className = `conn ${kind}`;
  setText("conn", text);
}

function render(snap) {
  lastSnapshot = Date.now();
  setText("updated", fmtTime(snap.at));
  const banner = $("error");
  if (snap.error) {
    banner.hidden = false;
    setText("error", `The stream server cannot be read: ${snap.error}`);
    setConn("error", "server unreachable");
    return;
  }
  banner.hidden = true;
  setConn("live", "live");
  renderStreams(snap);
  renderControls(snap);
  renderTables(snap);
  followJournal(snap);
}

function listen() {
  source = new EventSource("/api/events");
  source.onmessage = (event) => render(JSON.parse(event.data));
  // Each stream ends after a while and EventSource reconnects by itself; give up only when it does.
  source.onerror = () => {
    if (source.readyState === EventSource.CLOSED) setTimeout(listen, 2000);
  };
}

setInterval(() => {
  const age = Date.now() - lastSnapshot;
  if (lastSnapshot && age > STALE_MS) setConn("stale", `no update for ${Math.round(age / 1000)} s`);
}, 1000);

// ---- the operator's controls ---------------------------------------------------------------------

function say(kind, text) {
  const message = $("action-message");
  message.className = `message ${kind}`;
  message.textContent = text;
}

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

function showToken() {
  setText("token-status", token() ? "token set for this tab" : "no token: the controls will be refused");
  $("token-card").dataset.token = token() ? "set" : "unset";
}

async function post(path, body, done) {
  const headers = { "Content-Type": "application/json" };
  if (token()) headers.Authorization = `Bearer ${token()}`;
  let response;
  try {
    response = await fetch(path, { method: "POST", headers, body: JSON.stringify(body) });
  } catch (error) {
    say("refused", `not sent: ${error.message}`);
    return;
  }
  if (response.status === 401) {
    say("refused", "refused: token missing or wrong");
    return;
  }
  if (!response.ok) {
    let detail = response.statusText;
    try {
      const answer = await response.json();
      detail = typeof answer.detail === "string" ? answer.detail : JSON.stringify(answer.detail ?? answer);
    } catch {
      // not JSON: the status text says it
    }
    say("refused", `refused (${response.status}): ${detail}`);
    return;
  }
  say("ok", done);
}

function setKill(on) {
  if (!on && !window.confirm("Turn the kill switch OFF? Orders will be sent again.")) return;
  post("/api/kill-switch", { on }, on ? "kill switch ON: nothing is sent" : "kill switch OFF: trading allowed");
}

function setState(state) {
  const reason = window.prompt(`Reason for ${state} (recorded with the change):`, "");
  if (reason === null) return;
  if (!reason.trim()) {
    say("refused", "not sent: a reason is required");
    return;
  }
  post("/api/trading-state", { state, reason: reason.trim() }, `trading state set to ${state}`);
}

// ---- equity, from the journal --------------------------------------------------------------------

const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

// GET /api/equity: [{time, quote, realised, fills}, ...] oldest first -> quote -> [{time (ms), value}].
function equitySeries(data) {
  const series = new Map();
  for (const point of Array.isArray(data) ? data : []) {
    const time = Date.parse(point && point.time);
    const value = Number.parseFloat(point && point.realised);
    if (!Number.isFinite(time) || !Number.isFinite(value)) continue;
    const quote = String(point.quote || "");
    if (!series.has(quote)) series.set(quote, []);
    series.get(quote).push({ time, value });
  }
  return series;
}

const COLOURS = ["#2458b3", "#b3261e", "#1f7a3a", "#8a5a00"];

// An axis label: the time of day within one day's span, else the date and time (UTC).
function stamp(ms, span) {
  const iso = new Date(ms).toISOString();
  return span < 86400000 ? iso.slice(11, 19) : iso.slice(0, 16).replace("T", " ");
}

function drawEquity(series) {
  const chart = $("equity-chart");
  chart.replaceChildren();
  const all = [...series.values()].flat();
  $("equity-empty").hidden = all.length > 0;
  chart.style.display = all.length ? "" : "none"; // an SVG element has no `hidden` property
  if (!all.length) return;
  const [width, height, left, right, top, bottom] = [600, 220, 70, 14, 14, 30];
  let [low, high] = [Math.min(0, ...all.map((p) => p.value)), Math.max(0, ...all.map((p) => p.value))];
  if (low === high) [low, high] = [low - 1, high + 1];
  let [first, last] = [Math.min(...all.map((p) => p.time)), Math.max(...all.map((p) => p.time))];
  if (first === last) [first, last] = [first - 60000, last + 60000];
  const x = (ms) => left + ((ms - first) * (width - left - right)) / (last - first);
  const y = (v) => top + ((high - v) * (height - top - bottom)) / (high - low);
  for (const v of [low, (low + high) / 2, high]) {
    chart.append(svg("line", { x1: left, x2: width - right, y1: y(v), y2: y(v), class: "grid" }));
    const label = v.toLocaleString("en-US", { maximumFractionDigits: 2 });
    chart.append(svg("text", { x: left - 6, y: y(v) + 4, class: "axis", "text-anchor": "end" }, label));
  }
  chart.append(svg("line", { x1: left, x2: width - right, y1: y(0), y2: y(0), class: "zero" }));
  const span = last - first;
  chart.append(svg("text", { x: left, y: height - 8, class: "axis" }, stamp(first, span)));
  const lastLabel = { x: width - right, y: height - 8, class: "axis", "text-anchor": "end" };
  chart.append(svg("text", lastLabel, stamp(last, span)));
  const legend = [];
  [...series.entries()].forEach(([quote, points], index) => {
    const colour = COLOURS[index % COLOURS.length];
    // A step line: realised PnL holds its value until the next fill moves it.
    const steps = points.flatMap((p, i) =>
      i ? [[p.time, points[i - 1].value], [p.time, p.value]] : [[p.time, p.value]],
    );
    const line = steps.map(([t, v]) => `${x(t).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
    chart.append(svg("polyline", { points: line, class: "line", stroke: colour }));
    const end = points[points.length - 1];
    chart.append(svg("circle", { cx: x(end.time), cy: y(end.value), r: 3, fill: colour }));
    const text = `${quote} ${end.value.toLocaleString("en-US", { maximumFractionDigits: 8 })}`;
    legend.push(text);
    chart.append(svg("text", { x: left + 8, y: top + 12 + 14 * index, class: "legend", fill: colour }, text));
  });
  chart.setAttribute("aria-label", `realised PnL over time: ${legend.join(", ")}`);
}

// The chart is read again shortly after new results arrive or the journal moves (coalesced), not every tick.
let journalSeen = "";
let equityTimer = null;

function followJournal(snap) {
  const results = snap.streams.find((stream) => stream.key === "result");
  const journal = snap.stages.journal || {};
  const seen = `${results ? results.entries_added : 0}:${journal.lag}:${journal.pending}`;
  if (seen === journalSeen) return;
  const first = journalSeen === "";
  journalSeen = seen;
  if (!first && equityTimer === null) {
    equityTimer = setTimeout(() => {
      equityTimer = null;
      loadEquity();
    }, 1500);
  }
}

async function loadEquity() {
  try {
    const response = await fetch("/api/equity", { headers: { Accept: "application/json" } });
    drawEquity(equitySeries(response.ok ? await response.json() : []));
  } catch {
    drawEquity(new Map());
  }
}

// ---- start ---------------------------------------------------------------------------------------

function start() {
  drawPipeline();
  showToken();
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("token").value.trim();
    if (value) sessionStorage.setItem(TOKEN_KEY, value);
    $("token").value = "";
    showToken();
    say("", value ? "token kept for this tab" : "");
  });
  $("token-forget").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    showToken();
    say("", "token forgotten");
  });
  $("kill-on").addEventListener("click", () => setKill(true));
  $("kill-off").addEventListener("click", () => setKill(false));
  for (const button of document.querySelectorAll("#state-card button[data-state]")) {
    button.addEventListener("click", () => setState(button.dataset.state));
  }
  listen();
  loadEquity();
  setInterval(loadEquity, EQUITY_EVERY_MS);
}

start();
