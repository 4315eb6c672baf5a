#include "controller/web_page.h"

namespace ferry::controller {

std::string_view WebPage() {
  static constexpr std::string_view kPage = R"html(<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Ferry cluster</title>
<style>
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; margin-bottom: 0.2em; }
h2 { font-size: 1.1em; margin-top: 1.4em; }
table { border-collapse: collapse; min-width: 40em; }
th, td { text-align: left; padding: 0.25em 0.8em 0.25em 0; border-bottom: 1px solid #ddd; vertical-align: top; }
.bar { width: 12em; height: 0.9em; background: #eee; position: relative; display: inline-block; vertical-align: middle; }
.bar > div { height: 100%; background: #4a8; }
.bar.hot > div { background: #d54; }
.state-down, .status-failed, .state-lost { color: #c22; font-weight: bold; }
.state-draining, .state-migrating, .status-running { color: #b70; font-weight: bold; }
.muted { color: #777; }
#error { color: #c22; }
</style>
</head>
<body>
<h1>Ferry cluster</h1>
<div class="muted" id="status">loading...</div>
<div id="error"></div>
<h2>Hosts</h2>
<table id="hosts"><thead><tr><th>host</th><th>state</th><th>CPU</th><th>memory (VMs)</th><th>VMs</th></tr></thead><tbody></tbody></table>
<h2>VMs</h2>
<table id="vms"><thead><tr><th>VM</th><th>host</th><th>state</th><th>CPUs</th><th>memory</th></tr></thead><tbody></tbody></table>
<h2>Migrations</h2>
<table id="migrations"><thead><tr><th>VM</th><th>from</th><th>to</th><th>status</th><th>reason</th><th>total</th><th>downtime</th><th>started</th></tr></thead><tbody></tbody></table>
<h2>Plan now</h2>
<div id="plan" class="muted"></div>
<script>
"use strict";
function esc(s) { return String(s).replace(/[&<>"']/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c])); }
function bar(frac, hot) {
  const pct = Math.max(0, Math.min(100, frac * 100));
  return `<span class="bar${hot ? " hot" : ""}"><div style="width:${pct.toFixed(0)}%"></div></span> ${(frac * 100).toFixed(0)}%`;
}
function mib(b) { return (b / 1048576).toFixed(0) + " MiB"; }
function rows(id, html) { document.querySelector(`#${id} tbody`).innerHTML = html.join(""); }
async function get(path) {
  const r = await fetch(path);
  if (!r.ok) throw new Error(`${path}: HTTP ${r.status}`);
  return r.json();
}
async function refresh() {
  try {
    const [hosts, vms, migrations, plan, status] = await Promise.all(
      ["/v1/hosts", "/v1/vms", "/v1/migrations", "/v1/plan", "/v1/status"].map(get));
    const memOf = {};
    for (const v of vms) memOf[v.host] = (memOf[v.host] || 0) + v.mem_bytes;
    rows("hosts", hosts.map(h => {
      const cap = h.capacity || {}, use = h.usage || {};
      const load = use.cpu_load || 0, mem = cap.mem_bytes ? (memOf[h.name] || 0) / cap.mem_bytes : 0;
      return `<tr><td>${esc(h.name)}</td><td class="state-${esc(h.state)}">${esc(h.state)}</td>` +
             `<td>${bar(load, load > 0.75)} <span class="muted">${(use.cpus || 0).toFixed(2)} of ${cap.cpus || "?"}</span></td>` +
             `<td>${bar(mem, mem > 0.9)}</td><td>${h.vms.map(esc).join(", ")}</td></tr>`;
    }));
    rows("vms", vms.map(v => `<tr><td>${esc(v.name)}</td><td>${esc(v.host)}</td><td class="state-${esc(v.state)}">${esc(v.state)}</td>` +
                             `<td>${v.usage ? v.usage.cpus.toFixed(2) : ""}</td><td>${mib(v.mem_bytes)}</td></tr>`));
    rows("migrations", migrations.slice().reverse().slice(0, 50).map(m =>
      `<tr class="migration"><td>${esc(m.vm)}</td><td>${esc(m.from)}</td><td>${esc(m.to)}</td>` +
      `<td class="status-${esc(m.status)}">${esc(m.status)}${m.error ? ": " + esc(m.error) : ""}</td><td>${esc(m.reason)}</td>` +
      `<td>${m.status === "completed" ? m.total_ms.toFixed(0) + " ms" : ""}</td>` +
      `<td>${m.status === "completed" ? m.downtime_ms.toFixed(1) + " ms" : ""}</td>` +
      `<td>${new Date(m.started_ms).toLocaleTimeString()}</td></tr>`));
    const moves = plan.moves.map(m => `move ${esc(m.vm)} ${esc(m.from)} &rarr; ${esc(m.to)}: ${esc(m.reason)}`);
    const spots = plan.hotspots.map(h => `${esc(h.trigger)} on ${esc(h.host)}${h.vm ? " (" + esc(h.vm) + ")" : ""}: ` +
                                         (h.why_not.length ? esc(h.why_not.join("; ")) : "acting"));
    document.getElementById("plan").innerHTML = [...moves, ...spots].join("<br>") || "nothing to do";
    document.getElementById("status").textContent =
      `controller ${status.id} - ${status.leader ? "leader" : "standby"} - store ${status.store} - ` +
      `${status.migrations_running} migration(s) running - updated ${new Date().toLocaleTimeString()}`;
    document.getElementById("error").textContent = "";
  } catch (e) {
    document.getElementById("error").textContent = "update failed: " + e.message;
  }
}
refresh();
setInterval(refresh, 1000);
</script>
</body>
</html>
)html";
  return kPage;
}

}  // namespace ferry::controller
