// The privlink status page: asks /api/v1/status, /api/v1/connections, /api/v1/history and
// /api/v1/events every two seconds and draws the relay's endpoints, agents and open
// connections (or the agent's relay links and streams), charts of the last ten minutes and the
// last events. Every value is written with textContent or as an SVG attribute, never as HTML:
// names, reasons and addresses come from configurations, agents and clients.
"use strict";

const REFRESH_MS = 2000;
const TOKEN_KEY = "privlink-admin-token";

function element(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function badge(word) {
  return element("span", word, "badge " + word);
}

function since(unixSeconds) {
  if (!unixSeconds) return "–";
  return new Date(unixSeconds * 1000).toLocaleString();
}

function verdicts(map) {
  const words = Object.entries(map || {}).map(([endpoint, v]) =>
    endpoint + ": " + v.verdict + (v.reason ? " (" + v.reason + ")" : ""));
  return words.length ? words.join("; ") : "none yet";
}

function fill(tbodyId, rows, columns, emptyText) {
  const body = document.getElementById(tbodyId);
  body.replaceChildren();
  if (rows.length === 0) {
    const tr = element("tr");
    const td = element("td", emptyText, "empty");
    td.colSpan = columns;
    tr.append(td);
    body.append(tr);
    return;
  }
  for (const row of rows) body.append(row);
}

function cell(content, className) {
  const td = element("td", undefined, className);
  if (content instanceof Node) td.append(content); else td.textContent = String(content ?? "–");
  return td;
}

function endpointRow(e) {
  const tr = element("tr");
  tr.dataset.endpoint = e.name;
  tr.dataset.status = e.status;
  const status = element("span");
  status.append(badge(e.status));
  if (e.reason) status.append(element("span", e.reason, "reason"));
  tr.append(
    cell(e.name), cell(status), cell((e.approving_agents || []).join(", ") || "–"),
    cell(e.active_connections, "number"), cell(e.total_connections, "number"),
    cell(e.listen), cell(e.destination), cell(e.connector));
  return tr;
}

// A link's key exchange: post-quantum in green, classical in amber (with the version and the
// cipher suite on hover); "–" where this side cannot tell (an agent's QUIC link).
function keyExchange(tls, unknown) {
  if (!tls) return element("span", unknown || "–", "empty");
  const word = element("span", tls.key_exchange, "badge " + (tls.post_quantum ? "pq" : "classical"));
  word.title = tls.version + ", " + tls.cipher;
  return word;
}

// When the relay's certificate expires, flagged within two weeks.
function expiry(unixSeconds) {
  if (!unixSeconds) return element("span", "–", "empty");
  const days = Math.floor((unixSeconds * 1000 - Date.now()) / 86400000);
  const text = new Date(unixSeconds * 1000).toLocaleDateString() + " (" +
    (days < 0 ? "expired" : count(days, "day")) + ")";
  return element("span", text, days < 14 ? "reason" : undefined);
}

function agentRow(a) {
  const tr = element("tr");
  tr.dataset.agent = a.name;
  tr.dataset.keyExchange = a.tls ? a.tls.key_exchange : "";
  tr.append(
    cell(a.name + (a.draining ? " (draining)" : "")), cell(a.connector), cell(a.transport),
    cell(a.remote), cell(since(a.connected_since_unix)), cell(a.active_streams, "number"),
    cell(a.version), cell(keyExchange(a.tls)), cell(verdicts(a.verdicts)));
  return tr;
}

function linkRow(l) {
  const tr = element("tr");
  tr.dataset.relay = l.relay;
  tr.dataset.state = l.state;
  tr.append(
    cell(l.relay + (l.relay_id ? " → " + l.relay_id : "")), cell(l.address),
    cell(badge(l.state)), cell(l.transport || "–"),
    cell(keyExchange(l.tls, "–")),
    cell(expiry(l.relay_certificate_expires_unix)),
    cell(since(l.since_unix)), cell(l.active_streams, "number"), cell(verdicts(l.verdicts)),
    cell(l.last_error || "–"));
  return tr;
}

function routeRows(l) {
  return Object.entries(l.routes || {}).map(([name, endpoint]) => {
    const tr = element("tr");
    tr.dataset.listener = l.name;
    tr.append(cell(l.name), cell(l.listen), cell(name), cell(endpoint));
    return tr;
  });
}

function fleetRow(f) {
  const tr = element("tr");
  tr.dataset.relay = f.relay;
  tr.dataset.missing = String(f.missing.length);
  tr.append(
    cell(f.relay), cell(f.members.length, "number"), cell(f.reached.join(", ") || "–"),
    cell(f.missing.join(", ") || "none"));
  return tr;
}

// Most open connections drawn (the API lists up to 10,000, oldest first).
const SHOWN_CONNECTIONS = 100;

function bytes(n) {
  if (n < 1024) return n + " B";
  const units = ["KiB", "MiB", "GiB", "TiB"];
  let value = n / 1024;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return value.toFixed(value < 10 ? 1 : 0) + " " + units[unit];
}

function age(unixSeconds) {
  if (!unixSeconds) return "–";
  const seconds = Math.max(0, Math.round(Date.now() / 1000 - unixSeconds));
  if (seconds < 60) return seconds + " s";
  if (seconds < 3600) return Math.floor(seconds / 60) + " min " + (seconds % 60) + " s";
  return Math.floor(seconds / 3600) + " h " + Math.floor((seconds % 3600) / 60) + " min";
}

// One open connection: the relay's view (a client's) or the agent's (a stream's).
function connectionRow(c) {
  const tr = element("tr");
  tr.dataset.endpoint = c.endpoint;
  if ("agent" in c) {
    tr.append(
      cell(c.client), cell(c.endpoint), cell(c.destination || "–"), cell(c.agent),
      cell(age(c.started_unix), "number"), cell(bytes(c.bytes_from_client), "number"),
      cell(bytes(c.bytes_to_client), "number"));
  } else {
    tr.append(
      cell(c.endpoint), cell(c.client), cell(c.destination), cell(age(c.started_unix), "number"),
      cell(bytes(c.bytes_to_destination), "number"),
      cell(bytes(c.bytes_from_destination), "number"));
  }
  return tr;
}

function drawConnections(role, listed) {
  const columns = role === "relay"
    ? ["Client", "Endpoint", "Destination", "Agent", "Age", "From client", "To client"]
    : ["Endpoint", "Client", "Destination", "Age", "To destination", "From destination"];
  document.getElementById("connections-head")
    .replaceChildren(...columns.map((name) => element("th", name)));
  const connections = listed.connections || [];
  fill("connections", connections.slice(0, SHOWN_CONNECTIONS).map(connectionRow), columns.length,
    "No connection is open.");
  const more = (listed.total || 0) - Math.min(connections.length, SHOWN_CONNECTIONS);
  document.getElementById("connections-more").textContent =
    more > 0 ? "… and " + count(more, "more connection") + " (the oldest are shown)." : "";
}

// "1 agent", "2 agents": a count and its noun, in the right number.
function count(n, noun) {
  return n + " " + noun + (n === 1 ? "" : "s");
}

function draw(status) {
  document.getElementById("role").textContent = status.role + " " + status.version;
  const summary = document.getElementById("summary");
  summary.className = "";
  if (status.role === "relay") {
    document.getElementById("relay").hidden = false;
    const endpoints = status.endpoints || [];
    const active = endpoints.reduce((sum, e) => sum + (e.active_connections || 0), 0);
    const approved = endpoints.filter((e) => e.status === "Approved").length;
    summary.textContent = (status.ready ? "Ready" : "Not ready") +
      (status.not_ready_reason ? " (" + status.not_ready_reason + ")" : "") + " · " + approved +
      " of " + count(endpoints.length, "endpoint") + " approved · " +
      count((status.agents || []).length, "agent") + " connected · " +
      count(active, "connection") + " open" +
      (status.fleet ? " · relay " + status.fleet.id + " of a fleet of " +
        status.fleet.members.length : "");
    endpoints.sort((a, b) => a.name.localeCompare(b.name));
    fill("endpoints", endpoints.map(endpointRow), 8, "No endpoints configured.");
    fill("agents", (status.agents || []).map(agentRow), 9, "No agent is connected.");
    const listeners = status.listeners || [];
    document.getElementById("listeners-part").hidden = listeners.length === 0;
    fill("listeners", listeners.flatMap(routeRows), 4, "");
  } else {
    document.getElementById("agent").hidden = false;
    const links = status.links || [];
    const streams = links.reduce((sum, l) => sum + (l.active_streams || 0), 0);
    summary.textContent = (status.ready ? "Ready" : "Not ready") + " · agent " + status.name +
      " of connector " + status.connector + " · " +
      links.filter((l) => l.state === "connected").length + " of " +
      count(links.length, "relay link") + " connected · " + count(streams, "stream") + " open";
    fill("links", links.map(linkRow), 10, "No relay link yet.");
    const fleets = status.fleets || [];
    document.getElementById("fleets-part").hidden = fleets.length === 0;
    fill("fleets", fleets.map(fleetRow), 4, "");
  }
  document.getElementById("updated").textContent =
    "Last refreshed " + new Date().toLocaleTimeString() + ".";
}

const SVG = "http://www.w3.org/2000/svg";
const CHART = { width: 360, height: 120, left: 44, bottom: 16, top: 6 };
// Fixed colours for the outcomes an operator looks for; others take the palette in turn.
const OUTCOME_COLOURS = {
  completed: "#1a7f37", idle_timeout: "#6e7781", shutdown: "#8a93a5", max_duration: "#9a6700",
  acl_denied: "#cf222e", over_limit: "#bc4c00", rejected: "#a40e26", no_agent: "#8250df",
};
const PALETTE = ["#0969da", "#bf3989", "#1b7c83", "#953800", "#6639ba", "#4d2d00", "#116329"];

function svg(tag, attributes) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes || {})) {
    node.setAttribute(name, String(value));
  }
  return node;
}

// "1.2k", "3.4M": short numbers for an axis.
function short(n, unit) {
  const steps = [[1e9, "G"], [1e6, "M"], [1e3, "k"]];
  for (const [size, prefix] of steps) {
    if (n >= size) return (n / size).toFixed(n >= 10 * size ? 0 : 1) + " " + prefix + unit;
  }
  return (n >= 10 || Number.isInteger(n) ? n.toFixed(0) : n.toFixed(1)) + (unit ? " " + unit : "");
}

// Draws `series` ([{name, colour, values}], one value per bucket) into the SVG `id`, with its
// legend (each series' total or last value, from `legendValue`).
function chart(id, series, unit, legendValue) {
  const node = document.getElementById(id);
  const { width, height, left, bottom, top } = CHART;
  const plotHeight = height - bottom - top;
  const count = Math.max(...series.map((s) => s.values.length), 2);
  const max = Math.max(1e-9, ...series.flatMap((s) => s.values));
  const ceiling = unit === "" && max < 1 ? 1 : max;
  const x = (i) => left + (i * (width - left - 2)) / (count - 1);
  const y = (v) => top + plotHeight - (v / ceiling) * plotHeight;
  const parts = [
    svg("line", { class: "grid", x1: left, y1: top, x2: width, y2: top }),
    svg("line", { class: "grid", x1: left, y1: top + plotHeight, x2: width, y2: top + plotHeight }),
  ];
  const label = (text, attributes) => {
    const t = svg("text", Object.assign({ class: "axis" }, attributes));
    t.textContent = text;
    return t;
  };
  parts.push(label(short(ceiling, unit), { x: left - 4, y: top + 8, "text-anchor": "end" }));
  parts.push(label("0", { x: left - 4, y: top + plotHeight, "text-anchor": "end" }));
  parts.push(label("−10 min", { x: left, y: height - 2 }));
  parts.push(label("now", { x: width - 2, y: height - 2, "text-anchor": "end" }));
  for (const s of series) {
    // Right-aligned: the newest bucket at "now".
    const offset = count - s.values.length;
    const points = s.values.map((v, i) => x(i + offset).toFixed(1) + "," + y(v).toFixed(1));
    const line = svg("polyline", { points: points.join(" "), stroke: s.colour });
    line.dataset.series = s.name;
    parts.push(line);
    // The newest value as a dot too: with a single bucket yet, the line has no length.
    if (s.values.length) {
      const last = s.values.length - 1;
      parts.push(svg("circle",
        { cx: x(last + offset).toFixed(1), cy: y(s.values[last]).toFixed(1), r: 2.5, fill: s.colour }));
    }
  }
  node.replaceChildren(...parts);
  const legend = document.getElementById("legend-" + id.replace("chart-", ""));
  legend.replaceChildren(...series.map((s) => {
    const item = element("li");
    const swatch = element("span", undefined, "swatch");
    swatch.style.backgroundColor = s.colour;
    item.append(swatch, document.createTextNode(s.name + ": " + legendValue(s)));
    item.dataset.series = s.name;
    return item;
  }));
}

function drawHistory(role, history) {
  // Ten minutes are BUCKETS of bucket_seconds; a bucket still filling is as long as it has run
  // (at least a second, so that its first events do not read as a burst).
  const buckets = (history.buckets || []).slice(-Math.ceil(600 / (history.bucket_seconds || 5)));
  const perSecond = (value, b) => value / Math.max(b.seconds || 0, 1);
  const outcomes = [...new Set(buckets.flatMap((b) => Object.keys(b.ended || {})))].sort();
  let next = 0;
  const ended = outcomes.map((name) => ({
    name,
    colour: OUTCOME_COLOURS[name] || PALETTE[next++ % PALETTE.length],
    values: buckets.map((b) => perSecond((b.ended || {})[name] || 0, b)),
    total: buckets.reduce((sum, b) => sum + ((b.ended || {})[name] || 0), 0),
  }));
  document.getElementById("ended-caption").textContent = (role === "relay"
    ? "Connections" : "Streams") + " ended per second, by outcome";
  chart("chart-ended", ended, "/s", (s) => s.total + " in 10 min");
  const moved = [
    ["to destination", "#0969da", "bytes_to_destination"],
    ["to client", "#bf3989", "bytes_to_client"],
  ].map(([name, colour, key]) => ({
    name, colour,
    values: buckets.map((b) => perSecond(b[key] || 0, b)),
    total: buckets.reduce((sum, b) => sum + (b[key] || 0), 0),
  }));
  chart("chart-bytes", moved, "B/s", (s) => bytes(s.total) + " in 10 min");
  const peers = role === "relay" ? "agents connected" : "relay links connected";
  document.getElementById("peers-caption").textContent =
    peers.charAt(0).toUpperCase() + peers.slice(1);
  const levels = [{ name: peers, colour: "#1a7f37", values: buckets.map((b) => b.peers || 0) }];
  chart("chart-peers", levels, "", (s) => s.values.length ? s.values[s.values.length - 1] + " now" : "–");
}

// The events that mean someone or something was refused, and those that ended badly.
const DENIALS = new Set(["PL0003", "PL1003", "PL2002", "PL3004", "PL4003"]);
const ORDINARY_ENDS = new Set(["completed", "idle_timeout", "shutdown", "max_duration"]);
const SHOWN_EVENTS = 50;

function eventRow(e) {
  const tr = element("tr");
  tr.dataset.code = e.code;
  if (DENIALS.has(e.code)) tr.className = "denial";
  else if (e.outcome !== undefined && !ORDINARY_ENDS.has(e.outcome)) tr.className = "failed";
  const when = e.time ? new Date(e.time).toLocaleTimeString() : "–";
  const name = element("span", e.event);
  const code = element("span", e.code, "code");
  const details = element("span");
  for (const [key, value] of Object.entries(e)) {
    if (key === "time" || key === "code" || key === "event") continue;
    const field = element("span", undefined, "field");
    field.append(element("span", key, "key"), document.createTextNode(" " + String(value)));
    details.append(field);
  }
  const event = element("span");
  event.append(name, code);
  tr.append(cell(when, "time"), cell(event, "event"), cell(details));
  return tr;
}

function drawEvents(listed) {
  const events = (listed.events || []).slice(-SHOWN_EVENTS).reverse();
  fill("events", events.map(eventRow), 3, "No event yet.");
}

function unreachable(message) {
  const summary = document.getElementById("summary");
  summary.className = "unreachable";
  summary.textContent = message;
}

async function refresh() {
  const headers = {};
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = "Bearer " + token;
  try {
    const response = await fetch("/api/v1/status", { headers, cache: "no-store" });
    if (response.status === 401) {
      sessionStorage.removeItem(TOKEN_KEY);
      document.getElementById("token-form").hidden = false;
      unreachable(token ? "That token was not accepted." : "A bearer token is required.");
      return;
    }
    if (!response.ok) {
      unreachable("The admin listener answered " + response.status + ".");
      return;
    }
    document.getElementById("token-form").hidden = true;
    const status = await response.json();
    draw(status);
    const ask = (path) => fetch(path, { headers, cache: "no-store" });
    const [listed, history, events] =
      await Promise.all([ask("/api/v1/connections"), ask("/api/v1/history"), ask("/api/v1/events")]);
    if (listed.ok) drawConnections(status.role, await listed.json());
    if (history.ok) drawHistory(status.role, await history.json());
    if (events.ok) drawEvents(await events.json());
  } catch (e) {
    unreachable("The admin listener cannot be reached (" + e.message + "); retrying.");
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}

document.getElementById("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, document.getElementById("token").value);
  document.getElementById("token").value = "";
});

refresh();
