// The gpumesh console: plain ES module, no build step. It calls the agent's HTTP API with
// a bearer token kept in this tab's sessionStorage (never a cookie, never a query string:
// a token in the URL fragment, /ui#token=..., is read once and removed from the address).

const $ = (selector) => document.querySelector(selector);
const REFRESH_MS = 1000;
const STATE = (s) => (s || "").replace("TASK_STATE_", "");
const ENDED = new Set(["SUCCEEDED", "FAILED", "CANCELLED"]);

let token = sessionStorage.getItem("gpumesh-token") || "";
let openTask = "";
let openTrace = "";
let watching = null;

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

class Expired extends Error {}

async function api(path, options = {}) {
  const headers = { Authorization: `Bearer ${token}`, ...(options.headers || {}) };
  const reply = await fetch(path, { ...options, headers });
  if (reply.status === 401) throw new Expired((await reply.json()).message);
  const body = await reply.json();
  if (!reply.ok) throw new Error(`${reply.status}: ${body.message}`);
  return body;
}

// -- login ---------------------------------------------------------------------------

function takeTokenFromFragment() {
  const match = location.hash.match(/token=([^&]+)/);
  if (match) {
    token = decodeURIComponent(match[1]);
    sessionStorage.setItem("gpumesh-token", token);
    history.replaceState(null, "", location.pathname);
  }
}

function showLogin(why) {
  token = "";
  sessionStorage.removeItem("gpumesh-token");
  if (watching) watching.abort();
  $("#console").hidden = true;
  $("#logout").hidden = true;
  $("#login").hidden = false;
  $("#login-why").textContent = why;
}

function showConsole() {
  $("#login").hidden = true;
  $("#console").hidden = false;
  $("#logout").hidden = false;
}

// -- the map -------------------------------------------------------------------------

function loadBar(used, total) {
  const bar = el("div", { class: "bar" });
  const fill = el("div", { class: "fill" });
  fill.style.width = `${total ? Math.min(100, (100 * used) / total) : 0}%`;
  bar.append(fill);
  return bar;
}

function agentTile(agent, owner) {
  const slots = (agent.gpus || []).length;
  const running = agent.running || 0;
  const state = agent.state || "active";
  const tile = el("div", { class: `agent ${state}`, "data-agent": agent.agentId, "data-state": state });
  tile.append(
    el("div", { class: "name" }, agent.agentId, agent.agentId === owner ? el("span", { class: "owner" }, " owner") : ""),
    el("div", { class: "state" }, state),
    el("div", { class: "gpus" }, (agent.gpus || []).map((g) => g.name).join(", ")),
    loadBar(running, slots),
    el("div", { class: "dim" }, `${running}/${slots} running, ${agent.queued || 0} queued`),
    el("div", { class: "models" }, (agent.modelsLoaded || []).join(" ") || "no model loaded"),
  );
  return tile;
}

function renderMap(agents, queue) {
  const map = $("#map");
  const here = el("div", { class: "dc", "data-dc": queue.dc });
  const backlog = (queue.classes || []).map((c) => `${c.name} ${c.depth || 0}`).join(" · ");
  here.append(
    el("h3", {}, `DC ${queue.dc}`),
    el("div", { class: "dim" }, `queue owner ${queue.owner || "none"} · backlog ${backlog}`),
  );
  const tiles = el("div", { class: "agents" });
  for (const agent of agents) tiles.append(agentTile(agent, queue.owner));
  here.append(tiles);
  const others = el("div", { class: "remote" });
  for (const dc of queue.remote || []) {
    const link = el("div", { class: "link", "data-dc": dc.dc });
    link.append(
      el("div", { class: "arrow" }, `→ ${dc.inFlight || 0} in flight`),
      el("h3", {}, `DC ${dc.dc}`),
      el("div", { class: "dim" }, `${dc.agents || 0} agents, ${dc.tasks || 0}/${dc.capacity || 0} tasks, heard ${(dc.ageS || 0).toFixed(1)} s ago`),
      loadBar(dc.tasks || 0, dc.slots || 0),
    );
    others.append(link);
  }
  map.replaceChildren(here, others);
  $("#where").textContent = `answering: DC ${queue.dc}`;
}

// -- tasks ---------------------------------------------------------------------------

// When a queued task should start, as its record says (kept true as the queue moves).
function eta(status) {
  if (STATE(status.state) !== "QUEUED" || !status.expectedStart) return "";
  const inS = Math.max(0, (Date.parse(status.expectedStart) - Date.now()) / 1000);
  return `expected to start in ${inS.toFixed(0)} s`;
}

function taskRow(status) {
  const row = el("tr", { "data-task": status.taskId });
  const link = el("a", { href: `#task=${encodeURIComponent(status.taskId)}` }, status.taskId);
  const progress = status.progress || {};
  row.append(
    el("td", {}, link),
    el("td", { class: `state ${STATE(status.state).toLowerCase()}` }, STATE(status.state)),
    el("td", {}, status.agent || ""),
    el("td", {}, progress.total ? `${progress.step || 0}/${progress.total}` : progress.message || eta(status)),
    el("td", {}, (status.spec || {}).model || ""),
  );
  return row;
}

function renderTasks(listing) {
  const rows = (listing.tasks || []).map(taskRow);
  $("#tasks tbody").replaceChildren(...rows);
}

async function refresh() {
  if (!token) return;
  try {
    const state = $("#filter").value;
    const [agents, queue, listing] = await Promise.all([
      api("/v1/agents"),
      api("/v1/queue"),
      api(`/v1/tasks?limit=50${state ? `&state=${state}` : ""}`),
    ]);
    showConsole();
    renderMap(agents.agents || [], queue);
    renderTasks(listing);
    if (openTrace) await loadWaterfall(openTrace); // spans reach their files a little later
    $("#updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (error) {
    if (error instanceof Expired) showLogin(`Logged out: ${error.message}`);
    else $("#updated").textContent = `error: ${error.message}`;
  }
}

// -- one task: live status (Server-Sent Events), its path, its waterfall -----------------

function renderStatus(status) {
  const box = $("#task-status");
  box.replaceChildren(
    el("span", { class: `state ${STATE(status.state).toLowerCase()}`, id: "task-state" }, STATE(status.state)),
    el("span", { class: "dim" }, ` attempt ${status.attempt || 1}, agent ${status.agent || "-"} (DC ${status.dc || "-"})`),
    el("div", { class: "dim" }, (status.progress || {}).message || (status.error || {}).message || ""),
    el("div", { class: "dim", id: "task-eta" }, eta(status)),
  );
  const rerunOf = (status.spec || {}).rerunOf;
  if (rerunOf) {
    const link = el("a", { href: `#task=${encodeURIComponent(rerunOf)}`, id: "rerun-of" }, rerunOf);
    box.append(el("div", { class: "dim" }, "runs again ", link));
  }
  $("#rerun").hidden = !ENDED.has(STATE(status.state));
  const hops = [...(status.path || []), status.agent].filter(Boolean);
  $("#task-path").replaceChildren(...hops.map((hop) => el("li", {}, hop)));
  openTrace = status.traceId || "";
}

async function loadWaterfall(traceId) {
  const { spans } = await api(`/v1/traces/${traceId}`);
  if (!spans.length) return;
  const start = Math.min(...spans.map((s) => s.start_unix_ns));
  const end = Math.max(...spans.map((s) => s.end_unix_ns));
  const width = Math.max(1, end - start);
  const rows = spans.map((span) => {
    const row = el("div", { class: "span" });
    const bar = el("div", { class: "bar" });
    const fill = el("div", { class: "fill" });
    fill.style.marginLeft = `${(100 * (span.start_unix_ns - start)) / width}%`;
    fill.style.width = `${Math.max(0.5, (100 * (span.end_unix_ns - span.start_unix_ns)) / width)}%`;
    bar.append(fill);
    const ms = ((span.end_unix_ns - span.start_unix_ns) / 1e6).toFixed(1);
    row.append(el("div", { class: "label" }, `${span.name} · ${span.agent} · ${ms} ms`), bar);
    return row;
  });
  $("#waterfall").replaceChildren(...rows);
}

async function watch(taskId) {
  if (watching) watching.abort();
  watching = new AbortController();
  $("#task").hidden = false;
  $("#task-id").textContent = taskId;
  try {
    const reply = await fetch(`/v1/tasks/${encodeURIComponent(taskId)}:watch`, {
      headers: { Authorization: `Bearer ${token}` },
      signal: watching.signal,
    });
    if (reply.status === 401) return showLogin("Logged out: the token expired");
    const reader = reply.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const frame = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const data = frame.split("\n").find((line) => line.startsWith("data: "));
        if (data) {
          const event = JSON.parse(data.slice(6));
          if (event.status) renderStatus(event.status);
        }
      }
    }
  } catch (error) {
    if (error.name !== "AbortError") $("#task-status").textContent = `watch ended: ${error.message}`;
  }
}

function route() {
  const match = location.hash.match(/task=([^&]+)/);
  const taskId = match ? decodeURIComponent(match[1]) : "";
  if (taskId && taskId !== openTask) {
    openTask = taskId;
    watch(taskId);
  }
}

// -- submit --------------------------------------------------------------------------

async function submit(form) {
  const params = {};
  for (const pair of form.params.value.split(/\s+/).filter(Boolean)) {
    const [key, ...rest] = pair.split("=");
    params[key] = rest.join("=");
  }
  const spec = { pipeline: form.pipeline.value, model: form.model.value, params };
  if (form.payload.value) spec.payload = btoa(unescape(encodeURIComponent(form.payload.value)));
  try {
    const reply = await api("/v1/tasks", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ spec }),
    });
    $("#submit-result").textContent = `submitted ${reply.status.taskId}`;
    location.hash = `task=${encodeURIComponent(reply.status.taskId)}`;
    refresh();
  } catch (error) {
    if (error instanceof Expired) showLogin(`Logged out: ${error.message}`);
    else $("#submit-result").textContent = error.message;
  }
}

async function rerun() {
  try {
    const reply = await api(`/v1/tasks/${encodeURIComponent(openTask)}:rerun`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ newTaskId: crypto.randomUUID().replaceAll("-", "") }),
    });
    $("#rerun-result").textContent = "";
    location.hash = `task=${encodeURIComponent(reply.status.taskId)}`;
    refresh();
  } catch (error) {
    if (error instanceof Expired) showLogin(`Logged out: ${error.message}`);
    else $("#rerun-result").textContent = error.message;
  }
}

// -- wiring --------------------------------------------------------------------------

takeTokenFromFragment();
$("#login-form").addEventListener("submit", (event) => {
  event.preventDefault();
  token = $("#token").value.trim();
  sessionStorage.setItem("gpumesh-token", token);
  $("#token").value = "";
  refresh();
});
$("#logout").addEventListener("click", () => showLogin("Logged out."));
$("#submit-form").addEventListener("submit", (event) => {
  event.preventDefault();
  submit(event.target);
});
$("#filter").addEventListener("change", refresh);
$("#rerun").addEventListener("click", rerun);
window.addEventListener("hashchange", route);
if (token) refresh();
else showLogin("Paste a bearer token (meshctl token issue), or open the URL meshctl demo prints.");
route();
setInterval(refresh, REFRESH_MS);
