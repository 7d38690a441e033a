"""The status page at ``/``: plain HTML and a small script, no build step. It polls
``/status.json`` every 2 s (with ``#token=...`` in the address it sends that bearer token) and
shows users in memory, tokens/s, and per user the running reward and the recent rewards as a
curve (who is learning)."""

STATUS_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>cl_arch serve</title>
<style>
body{font:14px system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse}td,th{padding:.25em .8em;border-bottom:1px solid #ddd;text-align:left}
.n{font-variant-numeric:tabular-nums;text-align:right}#err{color:#b00}
</style></head><body>
<h1>cl_arch serve</h1>
<p>adaptation <b id="adapt">?</b> &middot; sessions in memory <b id="sessions">?</b> &middot;
tokens/s <b id="tps">?</b> &middot; decoding <b id="active">?</b> &middot; queued <b id="queue">?</b>
&middot; tokens <b id="tokens">?</b> &middot; commits <b id="commits">?</b></p>
<p id="err"></p>
<table><thead><tr><th>user</th><th>in memory</th><th class="n">rewards</th><th class="n">running reward</th>
<th class="n">accepted (last 50)</th><th>recent rewards</th></tr></thead><tbody id="users"></tbody></table>
<script>
const token = new URLSearchParams(location.hash.slice(1)).get("token");
function spark(rs) {
  if (!rs.length) return "";
  const w = 120, h = 24, lo = Math.min(0, ...rs), hi = Math.max(1e-9, ...rs);
  const pts = rs.map((r, i) => [i * w / Math.max(1, rs.length - 1), h - (r - lo) / (hi - lo) * h]);
  return '<svg width="' + w + '" height="' + h + '"><polyline fill="none" stroke="#36c" points="' +
         pts.map(p => p[0].toFixed(1) + "," + p[1].toFixed(1)).join(" ") + '"/></svg>';
}
function cell(text, cls) { const td = document.createElement("td"); td.textContent = text;
  if (cls) td.className = cls; return td; }
async function refresh() {
  try {
    const r = await fetch("status.json", token ? {headers: {Authorization: "Bearer " + token}} : {});
    if (!r.ok) throw new Error("status.json: HTTP " + r.status);
    const s = await r.json();
    document.getElementById("adapt").textContent = s.adapt ? "on" : "off";
    document.getElementById("sessions").textContent = s.sessions_in_memory;
    document.getElementById("tps").textContent = s.tokens_per_s.toFixed(1);
    document.getElementById("active").textContent = s.active;
    document.getElementById("queue").textContent = s.queue;
    document.getElementById("tokens").textContent = s.tokens_total;
    document.getElementById("commits").textContent = s.commits_total;
    const body = document.getElementById("users"); body.textContent = "";
    for (const u of s.users) {
      const tr = document.createElement("tr"); tr.dataset.user = u.id;
      const acc = u.rewards.filter(x => x > 0).length / Math.max(1, u.rewards.length);
      tr.append(cell(u.id), cell(u.in_memory ? "yes" : "no"), cell(u.rewards.length, "n"),
                cell(u.running_reward.toFixed(3), "n running"), cell(acc.toFixed(2), "n"));
      const td = document.createElement("td"); td.innerHTML = spark(u.rewards); tr.append(td);
      body.append(tr);
    }
    document.getElementById("err").textContent = "";
  } catch (e) { document.getElementById("err").textContent = String(e); }
}
refresh(); setInterval(refresh, 2000);
</script></body></html>
"""
