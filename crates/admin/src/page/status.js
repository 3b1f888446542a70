// The privlink status page: asks /api/v1/status and /api/v1/connections every two seconds and
// draws the relay's endpoints, agents and open connections, or the agent's relay links and
// streams. Every value is written with textContent, never as HTML: names, reasons and
// addresses come from configurations, agents and clients.
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

function agentRow(a) {
  const tr = element("tr");
  tr.dataset.agent = a.name;
  tr.append(
    cell(a.name + (a.draining ? " (draining)" : "")), cell(a.connector), cell(a.transport),
    cell(a.remote), cell(since(a.connected_since_unix)), cell(a.active_streams, "number"),
    cell(a.version), cell(verdicts(a.verdicts)));
  return tr;
}

function linkRow(l) {
  const tr = element("tr");
  tr.dataset.relay = l.relay;
  tr.dataset.state = l.state;
  tr.append(
    cell(l.relay + (l.relay_id ? " → " + l.relay_id : "")), cell(l.address),
    cell(badge(l.state)), cell(l.transport || "–"),
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
    fill("agents", (status.agents || []).map(agentRow), 8, "No agent is connected.");
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
    fill("links", links.map(linkRow), 8, "No relay link yet.");
    const fleets = status.fleets || [];
    document.getElementById("fleets-part").hidden = fleets.length === 0;
    fill("fleets", fleets.map(fleetRow), 4, "");
  }
  document.getElementById("updated").textContent =
    "Last refreshed " + new Date().toLocaleTimeString() + ".";
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
    const listed = await fetch("/api/v1/connections", { headers, cache: "no-store" });
    if (listed.ok) drawConnections(status.role, await listed.json());
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
