// The status page: polls api/status (the coordinator's JSON view of the job) every second and draws it. No build step.
"use strict";

const $ = id => document.getElementById(id);
const fmt = (x, digits = 0) => x == null ? "–" : Number(x).toLocaleString("en-US", { minimumFractionDigits: digits, maximumFractionDigits: digits });
const esc = s => String(s).replace(/[&<>"]/g, c => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c]));
const ago = iso => iso ? `${fmt((Date.now() - Date.parse(iso)) / 1000, 1)} s ago` : "–";

// A line chart on a canvas: series of {points: [[x, y]], color, dots}; axes from the data.
function chart(canvas, series, xLabel) {
  const ctx = canvas.getContext("2d"), w = canvas.width, h = canvas.height, pad = { l: 56, r: 12, t: 10, b: 28 };
  ctx.clearRect(0, 0, w, h);
  const all = series.flatMap(s => s.points);
  if (all.length === 0) { ctx.fillStyle = "#6a7385"; ctx.fillText("no data yet", w / 2 - 30, h / 2); return; }
  let [x0, x1] = [Math.min(...all.map(p => p[0])), Math.max(...all.map(p => p[0]))];
  let [y0, y1] = [Math.min(...all.map(p => p[1])), Math.max(...all.map(p => p[1]))];
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
  const X = x => pad.l + (x - x0) / (x1 - x0) * (w - pad.l - pad.r), Y = y => h - pad.b - (y - y0) / (y1 - y0) * (h - pad.t - pad.b);
  ctx.strokeStyle = "#e1e5ec"; ctx.fillStyle = "#6a7385"; ctx.font = "11px system-ui, sans-serif";
  for (let i = 0; i <= 4; i++) {
    const y = y0 + (y1 - y0) * i / 4;
    ctx.beginPath(); ctx.moveTo(pad.l, Y(y)); ctx.lineTo(w - pad.r, Y(y)); ctx.stroke();
    ctx.fillText(fmt(y, y1 - y0 < 10 ? 2 : 0), 4, Y(y) + 4);
    const x = x0 + (x1 - x0) * i / 4;
    ctx.fillText(fmt(x), X(x) - 10, h - 10);
  }
  ctx.fillText(xLabel, w - pad.r - 30, h - 10);
  for (const s of series) {
    ctx.strokeStyle = ctx.fillStyle = s.color; ctx.lineWidth = 1.5;
    if (s.dots) { for (const [x, y] of s.points) { ctx.beginPath(); ctx.arc(X(x), Y(y), 3.5, 0, 2 * Math.PI); ctx.fill(); } continue; }
    ctx.beginPath();
    s.points.forEach(([x, y], i) => i ? ctx.lineTo(X(x), Y(y)) : ctx.moveTo(X(x), Y(y)));
    ctx.stroke();
  }
}

function render(v) {
  $("job").textContent = v.job;
  $("state").textContent = v.state;
  $("state").className = "state " + v.state;
  document.title = `dtrain: ${v.job} (${v.state}, step ${v.step})`;
  const ev = v.lastEval;
  $("summary").innerHTML = [
    ["generation", fmt(v.generation)], ["step", `${fmt(v.step)} / ${fmt(v.lastStep)}`], ["loss", fmt(v.loss, 4)],
    ["val loss", ev ? `${fmt(ev.valLoss, 4)} (perplexity ${fmt(ev.valPerplexity, 2)}, step ${ev.step})` : "–"],
    ["lr", v.learningRate == null ? "–" : v.learningRate.toExponential(2)], ["tokens/s", fmt(v.tokensPerSecond)],
    ["restarts", fmt(v.restarts)], ["commits", fmt(v.commits)],
  ].map(([k, x]) => `<span>${k} <b>${esc(x)}</b></span>`).join("") + (v.reason ? `<span class="bad">${esc(v.reason)}</span>` : "");
  $("layout").textContent = v.layout ? `(${v.layout}, ${v.workers.length} of ${v.expectedWorkers})` : "";

  chart($("loss"), [
    { points: v.lossCurve.map(p => [p.step, p.loss]), color: "#2f6fdf" },
    { points: v.evals.map(e => [e.step, e.valLoss]), color: "#e0662b", dots: true },
  ], "step");
  chart($("throughput"), [{ points: v.lossCurve.map(p => [p.step, p.tokensPerSecond]), color: "#1f9d55" }], "step");

  const gb = x => x ? fmt(x / 1e9, 2) : "–";
  $("workers").tBodies[0].innerHTML = v.workers.map(w => {
    const s = w.sample;
    const eff = s && s.dataBusBandwidth ? `${gb(s.dataBusBandwidth)} (${fmt(100 * s.dataBusBandwidth / (s.linkCapacity || NaN))}%)`
      : s && s.tensorBusBandwidth ? `tp ${gb(s.tensorBusBandwidth)} (${fmt(100 * s.tensorBusBandwidth / (s.linkCapacity || NaN))}%)` : "–";
    return `<tr class="worker" data-rank="${w.rank}">` + [
      w.rank, `${w.dp}, ${w.tp}, ${w.pp}`, `${esc(w.host)}, ${w.processId}`, esc(w.state), fmt(w.step),
      s ? fmt(s.stepMs, 1) : "–",
      s ? `${fmt(s.computeMs, 1)} / ${fmt(s.communicationMs, 1)} / ${fmt(s.waitingMs, 1)} / ${fmt(s.optimizerMs, 1)}` : "–",
      eff, s ? gb(s.linkCapacity) : "–", s ? fmt(s.rssBytes / 1e6) : "–", s ? fmt(s.tensorBytes / 1e6, 1) : "–", s ? fmt(s.cpuCores, 2) : "–",
      s && s.gpuUtilisation != null ? `${fmt(100 * s.gpuUtilisation)}%, ${fmt(s.gpuMemoryBytes / 1e6)} MB` : "–",
      ago(w.lastReport),
    ].map((c, i) => `<td${i === 12 ? ' class="gpu"' : ""}>${c}</td>`).join("") + "</tr>";
  }).join("");
  $("workers").classList.toggle("no-gpu", !v.workers.some(w => w.sample && w.sample.gpuUtilisation != null));
  document.body.dataset.reportedWorkers = v.workers.filter(w => w.sample).length;

  const c = v.lastCheckpoint;
  $("checkpoint").innerHTML = c ? `step <b>${fmt(c.step)}</b>, ${fmt(c.bytes / 1e6, 1)} MB, committed ${ago(c.at)}` +
    (c.latencySeconds ? `, ${fmt(c.latencySeconds * 1000)} ms after the first shard` : "") + " · " +
    (c.verified == null ? "verifying…" : c.verified ? `<span class="ok">verified</span>` : `<span class="bad">does not verify: ${esc(c.problem)}</span>`) +
    `<br><span class="muted">${esc(c.directory)}</span>` : "none yet";
  $("events").innerHTML = v.events.slice().reverse().map(e =>
    `<li class="${e.kind}"><span class="muted">${new Date(e.at).toLocaleTimeString("en-GB")}</span> ${esc(e.text)}</li>`).join("");
  $("updated").textContent = new Date(v.updatedAt).toLocaleTimeString("en-GB");
}

async function poll() {
  try {
    const response = await fetch("api/status", { cache: "no-store" });
    if (response.ok) render(await response.json());
  } catch (e) {
    $("state").textContent = "unreachable";
    $("state").className = "state failed";
  }
  setTimeout(poll, 1000);
}
poll();
