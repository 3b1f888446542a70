// The privlink status page: asks /api/v1/status every two seconds and draws the relay's
// endpoints and agents, or the agent's relay links. Every value is written with textContent,
// never as HTML: names and reasons come from configurations and from agents.
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
    draw(await response.json());
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
