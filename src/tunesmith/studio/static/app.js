// tunesmith studio's page: plain JavaScript over the studio's HTTP API (every call here is one a script could make),
// charts by plotly.js (served by the studio from the installed plotly package). Pages by the URL's hash, so a
// refreshed or reopened tab shows the same page and, for a run, its whole history.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const main = $("#main");
let leave = [];  // cleanups of the current page (streams, timers)
let shown = 0;   // the navigation token: route() counts each page it starts; an answer for an earlier one is dropped

function esc(s) {
  return String(s ?? "").replace(/[&<>"']/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
}
function key() { return sessionStorage.getItem("tunesmith-key") || ""; }
function headers(extra = {}) {
  const h = {...extra};
  if (key()) h.Authorization = "Bearer " + key();
  return h;
}
async function api(path, opts = {}) {
  const isForm = opts.body instanceof FormData, asked = shown;
  const r = await fetch(path, {...opts, headers: headers(isForm || !opts.body ? {} : {"Content-Type": "application/json"}),
                               body: opts.body && !isForm ? JSON.stringify(opts.body) : opts.body});
  const text = await r.text();
  if (asked !== shown) return new Promise(() => {});  // asked for a page left since: what awaits it never draws
  let data = null;
  try { data = JSON.parse(text); } catch (e) { data = {text}; }
  if (r.status === 401) { $("#keybox").hidden = false; }
  if (!r.ok) throw new Error((data && data.error && data.error.message) || `${r.status} ${r.statusText}`);
  return data;
}
function toast(msg) {
  const t = $("#toast"); t.textContent = msg; t.style.display = "block";
  clearTimeout(toast.t); toast.t = setTimeout(() => { t.style.display = "none"; }, 3000);
}
function fmtSeconds(s) {
  if (s == null) return "";
  s = Math.round(s);
  return s >= 3600 ? `${Math.floor(s / 3600)} h ${Math.round(s % 3600 / 60)} min` : s >= 60 ? `${Math.floor(s / 60)} min ${s % 60} s` : `${s} s`;
}
function fmt(v) { return typeof v === "number" ? (Math.abs(v) >= 100 ? v.toFixed(0) : v.toPrecision(4)) : (v ?? ""); }
function measure(row, v) { return row.percent && typeof v === "number" ? `${(100 * v).toFixed(1)} %` : fmt(v); }  // a runs-table value as its task declares it
function marked(text) {  // data inspect's [train]...[/train] spans, highlighted
  return esc(text).replace(/\[train\]([\s\S]*?)\[\/train\]/g, "<mark>$1</mark>");
}

// ---------------------------------------------------------------- server-sent events over fetch
async function* sseBlocks(response) {  // the blank-line-separated blocks of an event stream, as they arrive
  const reader = response.body.getReader(), dec = new TextDecoder();
  let buf = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buf += dec.decode(value, {stream: true});
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      yield buf.slice(0, cut);
      buf = buf.slice(cut + 2);
    }
  }
}

// EventSource cannot send an API key, so the stream is read with fetch; on a dropped connection it reconnects with
// Last-Event-ID, and the server replays what was missed.
function follow(jobId, onEvent, onEnd) {
  let last = 0, stopped = false, ctrl = null;
  async function loop() {
    while (!stopped) {
      ctrl = new AbortController();
      try {
        const r = await fetch(`/v1/fine_tuning/jobs/${jobId}/events/stream`,
                              {headers: headers({"Last-Event-ID": String(last)}), signal: ctrl.signal});
        for await (const block of sseBlocks(r)) {
          const msg = {};
          for (const line of block.split("\n")) {
            const i = line.indexOf(": ");
            if (i > 0) msg[line.slice(0, i)] = line.slice(i + 2);
          }
          if (msg.event === "end") { stopped = true; onEnd && onEnd(JSON.parse(msg.data)); return; }
          if (msg.id) { last = Number(msg.id); onEvent(JSON.parse(msg.data)); }
        }
      } catch (e) { if (stopped) return; }
      if (!stopped) await new Promise(r => setTimeout(r, 1000));
    }
  }
  loop();
  return () => { stopped = true; ctrl && ctrl.abort(); };
}

// ---------------------------------------------------------------- pages
const pages = {
  async new() {
    const opts = await api("/v1/studio/options");
    const files = (await api("/v1/files?purpose=fine-tune")).data.filter(f => f.status === "processed");
    main.innerHTML = `
      <h1>New run</h1>
      <div class="grid">
        <div class="card">
          <label for="recipe">Recipe</label>
          <select id="recipe"><option value="">(none: LoRA on a model and a file)</option>
            ${opts.recipes.map(r => `<option value="${esc(r.name)}">${esc(r.name)} - ${esc(r.about)}</option>`).join("")}</select>
          <label for="model">Base model (a bundled name, a finished run's model, or a model under a folder the studio was started with --models)</label>
          <input id="model" list="models" value="${esc(opts.models[0] || "")}">
          <datalist id="models">${opts.models.map(m => `<option value="${esc(m)}">`).join("")}</datalist>
          <label for="file">Training data</label>
          <select id="file">${files.map(f => `<option value="${f.id}">${esc(f.filename)} (${esc(f.tunesmith.format)}, ${f.tunesmith.records} records)</option>`).join("")}
            <option value="">(upload a file below)</option></select>
          <label for="upload">Upload a data file (JSONL, JSON, CSV, Parquet, TXT)</label>
          <input id="upload" type="file" accept=".jsonl,.json,.csv,.tsv,.parquet,.txt">
          <div id="uploadmsg" class="dim"></div>
          <label for="method">Method</label>
          <select id="method"><option value="">(the recipe's: LoRA by default)</option>
            ${opts.methods.map(m => `<option>${esc(m)}</option>`).join("")}</select>
          <label for="objective">Objective</label>
          <select id="objective"><option value="supervised">supervised (SFT)</option><option value="dpo">DPO (preference pairs)</option></select>
          <div class="grid">
            <div><label for="epochs">Epochs</label><input id="epochs" placeholder="auto"></div>
            <div><label for="lrm">Learning-rate multiplier</label><input id="lrm" placeholder="auto (1 x the method's tuned rate)"></div>
          </div>
          <label for="suffix">Name suffix</label><input id="suffix" placeholder="e.g. mine">
          <label for="overrides">Other settings, one key=value per line (docs/config.md)</label>
          <textarea id="overrides" rows="4" placeholder="train.max_steps=20&#10;data.max_length=512"></textarea>
          <div class="row">
            <button id="inspect">Preview data</button><button id="plan">Plan</button>
            <button id="launch" class="primary">Launch</button>
          </div>
          <div id="formerror" class="error" role="alert"></div>
        </div>
        <div class="card"><h2>Data preview</h2><pre id="preview" class="dim">Pick a file and press Preview data.</pre>
          <h2>Plan</h2><pre id="planout" class="dim">Press Plan for memory and time.</pre></div>
      </div>`;
    $("#upload").onchange = async () => {
      const f = $("#upload").files[0];
      if (!f) return;
      const form = new FormData(); form.append("purpose", "fine-tune"); form.append("file", f);
      $("#uploadmsg").textContent = "uploading and checking...";
      try {
        const up = await api("/v1/files", {method: "POST", body: form});
        if (up.status !== "processed") { $("#uploadmsg").innerHTML = `<span class="error">${esc(up.status_details)}</span>`; return; }
        const o = document.createElement("option");
        o.value = up.id; o.textContent = `${up.filename} (${up.tunesmith.format}, ${up.tunesmith.records} records)`;
        $("#file").prepend(o); $("#file").value = up.id;
        $("#uploadmsg").innerHTML = `<span class="ok">${esc(up.filename)}: ${esc(up.tunesmith.format)}, ${up.tunesmith.records} records</span>`;
      } catch (e) { $("#uploadmsg").innerHTML = `<span class="error">${esc(e.message)}</span>`; }
    };
    const settings = () => {
      const overrides = $("#overrides").value.split("\n").map(s => s.trim()).filter(Boolean);
      if ($("#method").value) overrides.unshift(`method.name=${$("#method").value}`);
      const hp = {};
      if ($("#epochs").value.trim()) hp.n_epochs = Number($("#epochs").value);
      if ($("#lrm").value.trim()) hp.learning_rate_multiplier = Number($("#lrm").value);
      const s = {model: $("#model").value.trim(), training_file: $("#file").value || null, recipe: $("#recipe").value || null,
                 method: $("#objective").value, overrides, hyperparameters: hp};
      return window.tunesmithRL ? tunesmithRL.settings(s) : s;  // reward model / RL: its task and rl.* keys (rl.js)
    };
    if (window.tunesmithRL) await tunesmithRL.form(opts, settings);  // the RL choices and the headroom check (rl.js)
    const guard = async (fn) => {
      $("#formerror").textContent = "";
      try { await fn(); } catch (e) { $("#formerror").textContent = e.message; }
    };
    $("#inspect").onclick = () => guard(async () => {
      $("#preview").textContent = "reading...";
      $("#preview").innerHTML = marked((await api("/v1/studio/inspect", {method: "POST", body: settings()})).text);
    });
    $("#plan").onclick = () => guard(async () => {
      $("#planout").textContent = "estimating...";
      const p = await api("/v1/studio/plan", {method: "POST", body: settings()});
      $("#planout").innerHTML = `<span class="${p.fits ? "ok" : "error"}">${p.fits ? "fits" : "does not fit"}</span>\n` + esc(p.text);
    });
    $("#launch").onclick = () => guard(async () => {
      const s = settings();
      const body = {model: s.model, training_file: s.training_file, method: {type: s.method},
                    tunesmith: {recipe: s.recipe, overrides: s.overrides}};
      if (Object.keys(s.hyperparameters).length) body.hyperparameters = s.hyperparameters;
      if ($("#suffix").value.trim()) body.suffix = $("#suffix").value.trim();
      const job = await api("/v1/fine_tuning/jobs", {method: "POST", body});
      location.hash = `#/run/${job.tunesmith.run}`;
    });
  },

  async runs() {
    const runs = (await api("/v1/studio/runs")).data;
    main.innerHTML = `
      <h1>Runs</h1>
      <div class="row"><button id="compare" disabled>Compare selected</button>
        <span class="dim">${runs.length} runs; pick two or more to compare</span></div>
      <table id="runtable"><thead><tr><th></th><th>run</th><th>status</th><th>task</th><th>method</th><th>base</th>
        <th>key metric (before &rarr; after)</th><th>steps</th><th>duration</th><th></th></tr></thead><tbody>
      ${runs.map(r => `<tr data-run="${esc(r.name)}">
        <td><input type="checkbox" class="pick" value="${esc(r.name)}" aria-label="select ${esc(r.name)}"></td>
        <td><a href="#/run/${encodeURIComponent(r.name)}">${esc(r.name)}</a>${r.model && r.model !== r.name ? `<div class="dim">${esc(r.model)}</div>` : ""}</td>
        <td class="status ${esc(r.status)}">${esc(r.status)}</td><td>${esc(r.task)}</td><td>${esc(r.method)}</td>
        <td>${esc(r.base)}</td><td>${r.metric ? `${esc(r.metric_label || r.metric)} ${measure(r, r.before)} &rarr; ${measure(r, r.value)}
          <span class="dim">(${r.higher_is_better ? "higher" : "lower"} is better)</span>` : ""}</td>
        <td>${r.step}${r.total_steps ? " / " + r.total_steps : ""}</td><td>${fmtSeconds(r.seconds)}</td>
        <td>${r.report ? `<a href="#" class="report" data-run="${esc(r.name)}">report</a>` : ""}</td></tr>`).join("")}
      </tbody></table>
      ${runs.length ? "" : `<p>No runs yet: start one under <a href="#/new">New run</a>, or point <code>--runs</code> at a folder of runs.</p>`}`;
    const picks = () => [...document.querySelectorAll(".pick:checked")].map(x => x.value);
    document.querySelectorAll(".pick").forEach(x => x.onchange = () => { $("#compare").disabled = picks().length < 2; });
    $("#compare").onclick = () => { location.hash = `#/compare/${picks().map(encodeURIComponent).join(",")}`; };
    document.querySelectorAll("a.report").forEach(a => a.onclick = (e) => { e.preventDefault(); openReport(a.dataset.run); });
  },

  async run(name) {
    main.innerHTML = `<h1 id="title">${esc(name)}</h1><p id="about" class="dim"></p>
      <div class="row"><span id="status" class="status"></span><span id="progress" class="dim"></span>
        <button id="stop" hidden>Stop (checkpoint)</button><button id="resume" hidden>Resume</button>
        <a href="#/judge/${encodeURIComponent(name)}" id="judgelink" hidden>Blind A/B</a>
        <a href="#" id="report" hidden>report.html</a></div>
      <div class="bar" aria-label="progress"><div id="bar" style="width:0%"></div></div>
      <div class="grid">
        <div class="card"><div id="loss" class="chart"></div></div>
        <div class="card"><div id="lr" class="chart"></div></div>
        <div class="card"><div id="speed" class="chart"></div></div>
        <div class="card log-card"><h2>Log</h2><pre id="log"></pre></div>
      </div>
      <div id="lineagebox" class="card" hidden><h2>Lineage</h2><table id="lineage"></table>
        <p class="dim">Each generation's win rate over its parent: its share of the decided blind A/B pairs between the two
          (ties dropped), with a 95 % Wilson interval and an exact two-sided sign test.</p></div>
      <div id="exportbox" class="card" hidden><h2>Export</h2>
        <div class="row"><label for="format" style="margin:0">Format</label>
          <select id="format" style="width:auto"><option value="hf">Hugging Face (merged)</option><option value="gguf">GGUF (verified)</option><option value="adapter">adapter</option></select>
          <button id="export">Export</button><span id="exportmsg"></span></div><pre id="exportout" hidden></pre></div>
      <div id="err" class="error" role="alert"></div>`;
    const info = await api(`/v1/studio/runs/${encodeURIComponent(name)}`);
    // The charts are the ones the run's task declares (GET .../runs/{name} `shows`, catalog.py): the first three in
    // the grid (an RL run's others are on its RL panel, rl.js), each curve a metrics.jsonl key over the raw rows.
    let declared = [];  // until the run has a config (a queued job): none; `show` takes them when they come
    const rows = [];
    let next = 0;
    const layout = (title, y) => ({title: {text: title, font: {size: 14}}, margin: {l: 50, r: 10, t: 34, b: 36},
                                   xaxis: {zeroline: false}, yaxis: {title: {text: y}},
                                   legend: {orientation: "h"}});  // x: the step (no axis title: a legend of several rows would sit on it)
    const cfg = {displayModeBar: false, responsive: true};
    const chartIds = ["loss", "lr", "speed"];
    const declare = (shows) => {
      if (declared.length || !shows || !$("#loss")) return;
      declared = (shows.charts || []).slice(0, 3);
      chartIds.forEach((id, i) => { $("#" + id).parentElement.hidden = !declared[i]; });
      declared.forEach((chart, i) => Plotly.newPlot(chartIds[i], [], layout(chart.title, chart.y), cfg));
      redraw();
    };
    const traces = (chart) => chart.curves.flatMap(c => {
      const keys = !c.key.includes("*") ? [c.key] : [...new Set(rows.flatMap(Object.keys))].filter(k =>  // `*`: one part of the key
        new RegExp("^" + c.key.split("*").map(p => p.replace(/[.?+^$()[\]{}|\\]/g, "\\$&")).join("([^/]+)") + "$").test(k));
      return keys.map(k => {
        const part = c.key.includes("*") ? k.slice(c.key.indexOf("*"), k.length - (c.key.length - c.key.indexOf("*") - 1)) : "";
        const use = rows.filter(r => r[k] != null && !(chart.skip && r[chart.skip]));
        return {x: use.map(r => r.step), y: use.map(r => r[k]), name: c.label === "*" ? part : c.label,
                mode: c.held_out ? "lines+markers" : "lines", line: c.dashed ? {dash: "dot"} : {}};
      });
    });
    let pending = false;
    const redraw = () => {
      if (pending) return; pending = true;
      requestAnimationFrame(() => {
        pending = false;
        if (!$("#loss")) return;  // the page was left meanwhile
        declared.forEach((chart, i) => {
          const data = traces(chart), lay = layout(chart.title.charAt(0).toUpperCase() + chart.title.slice(1), chart.y);
          const ys = data.flatMap(t => t.y), top = Math.max(0, ...ys);
          if (chart.share) lay.yaxis.range = [0, 1];
          else if (top > 0 && Math.min(...ys) === top) lay.yaxis.range = [0, 1.5 * top];  // a constant (a learning rate): autorange would put it at "0"
          Plotly.react(chartIds[i], data, lay, cfg);
        });
        const first = declared.length ? document.getElementById("loss").data : null;
        $("#loss").dataset.points = first && first.length ? first[0].x.length : 0;  // what the chart draws
      });
    };
    const progress = () => {
      const d = [...rows].reverse().find(r => r.total_steps);
      if (!d || !$("#bar")) return;
      $("#bar").style.width = `${Math.min(100, 100 * d.step / d.total_steps)}%`;
      const eta = d.elapsed && d.step ? d.elapsed / d.step * (d.total_steps - d.step) : null;
      $("#progress").textContent = `step ${d.step} / ${d.total_steps}` + (eta != null && d.step < d.total_steps ? `, about ${fmtSeconds(eta)} left` : "");
    };
    let pulling = null, again = false;
    const pull = async () => {  // the rows written since the last pull (a resumed run that rewrote its file: all again)
      if (pulling) { again = true; return pulling; }
      pulling = (async () => {
        do {
          again = false;
          const r = await api(`/v1/studio/runs/${encodeURIComponent(name)}/metrics?since=${next}`);
          if (r.next < next) { rows.length = 0; next = 0; again = true; continue; }
          rows.push(...r.data); next = r.next;
        } while (again);
        progress(); redraw();
      })().finally(() => { pulling = null; });
      return pulling;
    };
    declare(info.shows);
    const logLine = (text) => { const l = $("#log"); if (!l) return; l.textContent += text + "\n"; l.scrollTop = l.scrollHeight; };
    const show = (row) => {
      if (!$("#status")) return;
      declare(row.shows);
      if (row.method !== "?") {
        $("#about").textContent = [`${row.method} on ${row.base}`, row.task, row.model ? `model ${row.model}` : ""]
          .filter(Boolean).join(" \u00b7 ");
      }
      if ($("#status").textContent && $("#status").textContent !== row.status) showLineage(name).catch(() => {});  // a child's row changes
      $("#status").textContent = row.status; $("#status").className = `status ${row.status}`;
      const live = ["running", "queued", "validating_files"].includes(row.status);
      $("#stop").hidden = !(row.job && live);
      $("#resume").hidden = !(row.job && ["paused", "cancelled"].includes(row.status));
      $("#judgelink").hidden = $("#exportbox").hidden = row.status !== "succeeded";
      $("#report").hidden = !row.report;
    };
    show(info);
    if (window.tunesmithRL) tunesmithRL.runPage(name, leave);  // an RL run's charts and alarms (rl.js)
    showLineage(name).catch(e => { $("#err").textContent = e.message; });
    $("#report").onclick = (e) => { e.preventDefault(); openReport(name); };
    const refresh = async () => show(await api(`/v1/studio/runs/${encodeURIComponent(name)}`));
    if (info.job) {
      const job = info.job;
      $("#stop").onclick = async () => {
        try { await api(`/v1/fine_tuning/jobs/${job}/pause`, {method: "POST"}); toast("stopping after this step; writing a checkpoint"); }
        catch (e) { $("#err").textContent = e.message; }
      };
      $("#resume").onclick = async () => {
        try {
          await api(`/v1/fine_tuning/jobs/${job}/resume`, {method: "POST"});
          await refresh(); start();
        } catch (e) { $("#err").textContent = e.message; }
      };
      let stopFollow = null;
      const start = () => {
        if (stopFollow) stopFollow();
        rows.length = 0; next = 0;
        $("#log").textContent = "";
        stopFollow = follow(job, (ev) => {
          if (ev.type === "metrics") pull(); else logLine(ev.message);
          if (ev.type !== "metrics") refresh();
        }, () => { refresh(); pull(); });
      };
      start();
      const timer = setInterval(refresh, 3000);
      leave.push(() => { stopFollow && stopFollow(); clearInterval(timer); });
    } else {  // a run started from the CLI: its files, read again every few seconds while it runs
      const load = async () => {
        await pull();
        $("#log").textContent = (await api(`/v1/studio/runs/${encodeURIComponent(name)}/log`)).lines.join("\n");
        await refresh();
      };
      await load();
      const timer = setInterval(load, 3000);
      leave.push(() => clearInterval(timer));
    }
    $("#export").onclick = async () => {
      $("#exportmsg").textContent = "exporting..."; $("#exportout").hidden = true;
      try {
        const r = await api(`/v1/studio/runs/${encodeURIComponent(name)}/export`, {method: "POST", body: {format: $("#format").value}});
        $("#exportmsg").innerHTML = `<span class="ok">done</span> <a href="#" id="download">download ${esc(r.format)}.zip</a>`;
        $("#exportout").hidden = false; $("#exportout").textContent = r.output.join("\n");
        $("#download").onclick = (e) => { e.preventDefault(); download(r.download, `${name}-${r.format}.zip`); };
      } catch (e) { $("#exportmsg").innerHTML = `<span class="error">${esc(e.message)}</span>`; }
    };
  },

  async compare(list) {
    const names = list.split(",").map(decodeURIComponent);
    main.innerHTML = `<h1>Compare ${names.length} runs</h1><div class="card"><div id="cmp" class="chart" style="height:340px"></div></div>
      <h2>Metrics</h2><table id="cmptable"></table>`;
    const traces = [], rows = [];
    for (const n of names) {
      const m = (await api(`/v1/studio/runs/${encodeURIComponent(n)}/metrics`)).data;
      const info = await api(`/v1/studio/runs/${encodeURIComponent(n)}`);
      traces.push({x: m.filter(r => r.loss != null).map(r => r.step), y: m.filter(r => r.loss != null).map(r => r.loss), name: `${n} train`, mode: "lines"});
      const ev = m.filter(r => r.eval_loss != null);
      traces.push({x: ev.map(r => r.step), y: ev.map(r => r.eval_loss), name: `${n} held-out`, mode: "lines+markers", line: {dash: "dot"}});
      rows.push({name: n, info, after: (info.summary || {}).after || {}, before: (info.summary || {}).before || {}});
    }
    Plotly.newPlot("cmp", traces, {title: {text: "Loss", font: {size: 14}}, margin: {l: 50, r: 10, t: 34, b: 36},
                                   xaxis: {title: {text: "step"}, zeroline: false}, legend: {orientation: "h", y: -0.3, yanchor: "top"}},  // below the axis title, not on it
                   {displayModeBar: false, responsive: true});
    const keys = [...new Set(rows.flatMap(r => Object.keys(r.after)))].filter(k => (k.startsWith("eval_") || k.startsWith("rouge") || k.includes("accuracy")) && !k.endsWith("_tokens"));
    $("#cmptable").innerHTML = `<thead><tr><th>metric</th>${rows.map(r => `<th>${esc(r.name)}<div class="dim">${esc(r.info.method)} / ${esc(r.info.task)}</div></th>`).join("")}</tr></thead>
      <tbody>${keys.map(k => `<tr><td>${esc(k)}</td>${rows.map(r => `<td>${fmt(r.after[k])}</td>`).join("")}</tr>`).join("")}
      <tr><td>duration</td>${rows.map(r => `<td>${fmtSeconds(r.info.seconds)}</td>`).join("")}</tr></tbody>`;
    $("#cmp").dataset.traces = traces.length;
  },

  async playground() {
    const models = (await api("/v1/models")).data.map(m => m.id);
    const pick = (id, i) => `<select id="${id}" aria-label="model ${i}">${models.map((m, j) => `<option ${j === i ? "selected" : ""}>${esc(m)}</option>`).join("")}</select>`;
    main.innerHTML = `<h1>Playground</h1>
      <div class="card"><label for="prompt">Prompt</label><textarea id="prompt" rows="3"></textarea>
        <div class="row"><label style="margin:0">temperature <input id="temp" type="number" step="0.1" min="0" max="2" value="0" style="width:80px"></label>
          <label style="margin:0">top-p <input id="topp" type="number" step="0.05" min="0.05" max="1" value="1" style="width:80px"></label>
          <label style="margin:0">max tokens <input id="maxt" type="number" min="1" max="1024" value="128" style="width:90px"></label>
          <button id="go" class="primary">Ask both (Ctrl+Enter)</button></div></div>
      <div class="grid"><div class="card">${pick("ma", 0)}<div id="aa" class="answer"></div></div>
        <div class="card">${pick("mb", Math.min(1, models.length - 1))}<div id="ab" class="answer"></div></div></div>
      <div id="err" class="error" role="alert"></div>`;
    async function ask(model, out) {
      out.innerHTML = "<span class='dim'>generating...</span>";
      let started = false;
      const r = await fetch("/v1/chat/completions", {method: "POST", headers: headers({"Content-Type": "application/json"}),
        body: JSON.stringify({model, stream: true, messages: [{role: "user", content: $("#prompt").value}],
                              temperature: Number($("#temp").value), top_p: Number($("#topp").value), max_tokens: Number($("#maxt").value)})});
      if (!r.ok) { const e = await r.json(); throw new Error(e.error.message); }
      for await (const line of sseBlocks(r)) {
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
        const d = JSON.parse(line.slice(6));
        if (d.choices && d.choices[0].delta.content) {
          if (!started) { out.textContent = ""; started = true; }
          out.textContent += d.choices[0].delta.content;
        }
      }
      if (!started || !out.textContent.trim()) out.innerHTML = "<span class='dim'>(an empty answer)</span>";
      out.dataset.done = "1";
    }
    const go = async () => {
      $("#err").textContent = ""; $("#aa").dataset.done = $("#ab").dataset.done = "";
      try { await Promise.all([ask($("#ma").value, $("#aa")), ask($("#mb").value, $("#ab"))]); }
      catch (e) { $("#err").textContent = e.message; }
    };
    $("#go").onclick = go;
    $("#prompt").onkeydown = (e) => { if (e.key === "Enter" && e.ctrlKey) go(); };
  },

  async judge(name) {
    main.innerHTML = `<h1>Blind A/B: ${esc(name)}</h1>
      <p class="dim">Two models answer the same held-out prompt, in random order; pick the better answer. Keys: <b>1</b> or <b>A</b> = first,
        <b>2</b> or <b>B</b> = second, <b>T</b> or <b>0</b> = tie.</p>
      <p id="pairabout" class="dim"></p>
      <div class="row"><label style="margin:0">pairs <input id="npairs" type="number" min="1" max="200" value="10" style="width:80px"></label>
        <button id="startj">New set of pairs</button>
        <a href="#" id="exportj">export judgements (JSONL)</a>
        <label class="filelabel" style="margin:0">import judgements (JSONL) <input id="importj" type="file" accept=".jsonl,.ndjson,.json"></label></div>
      <div id="importmsg" role="status"></div>
      <div id="summary" class="card"></div>
      <div id="pair" class="judge"></div><div id="err" class="error" role="alert"></div>
      <div id="loopbox" class="card"><h2>Train on these judgements</h2>
        <p class="dim">A child run starts from the judged model and learns from this run's judgements (winner chosen,
          loser rejected, ties dropped); it records its parent and the judgements it learned from. When it has finished,
          its own Blind A/B page judges it against this model on held-out prompts no judgement used.</p>
        <div class="row"><label for="loopmethod" style="margin:0">Method</label>
          <select id="loopmethod" style="width:auto">
            <option value="dpo" selected>DPO from the judged model (default)</option>
            <option value="reward">reward model, then GRPO: step 1, the reward model</option></select>
          <label style="margin:0">epochs <input id="loopepochs" type="number" min="1" max="50" placeholder="auto" style="width:80px"></label>
          <button id="trainj" class="primary">Train on these judgements</button></div>
        <div id="looperr" class="error" role="alert"></div><div id="children"></div></div>`;
    let state = null;
    const render = () => {
      const s = state.summary;
      $("#summary").innerHTML = !s.n ? "No judgements yet." : s.win_rate == null ? `${s.n} judgements, all ties.` :
        `<b>${esc(s.b)}</b> vs <b>${esc(s.a)}</b>: ${s.wins} wins, ${s.losses} losses, ${s.ties} ties &middot; win rate
         <b id="winrate">${(100 * s.win_rate).toFixed(0)} %</b> (95 % interval ${(100 * s.ci95[0]).toFixed(0)}-${(100 * s.ci95[1]).toFixed(0)} %)
         &middot; sign test p = ${s.p_sign_test.toPrecision(3)}`;
      $("#summary").dataset.n = s.n || 0;
      if (state.next == null) {
        $("#pair").innerHTML = state.pairs.length ? "<p>All pairs judged. Start a new set for more.</p>" : "<p>Start a set of pairs.</p>";
        return;
      }
      const p = state.pairs[state.next], empty = "<span class='dim'>(an empty answer)</span>";
      $("#pair").innerHTML = `<h2>Pair ${state.next + 1} of ${state.pairs.length}</h2><pre>${esc(p.prompt)}</pre>
        <div class="grid"><div class="card"><h2>A</h2><div class="answer" data-text="${esc(p.first)}">${esc(p.first) || empty}</div></div>
        <div class="card"><h2>B</h2><div class="answer" data-text="${esc(p.second)}">${esc(p.second) || empty}</div></div></div>
        <div class="row"><button class="choice" data-c="first">A is better (1)</button><button class="choice" data-c="tie">Tie (T)</button>
        <button class="choice" data-c="second">B is better (2)</button></div>`;
      document.querySelectorAll(".choice").forEach(b => b.onclick = () => vote(b.dataset.c));
    };
    const vote = async (choice) => {
      if (!state || state.next == null) return;
      try { state = await api(`/v1/studio/runs/${encodeURIComponent(name)}/judge/${state.next}`, {method: "POST", body: {choice}}); render(); }
      catch (e) { $("#err").textContent = e.message; }
    };
    const onKey = (e) => {
      if (e.target.tagName === "INPUT" || e.target.tagName === "TEXTAREA") return;
      const c = {"1": "first", "a": "first", "2": "second", "b": "second", "t": "tie", "0": "tie"}[e.key.toLowerCase()];
      if (c) { e.preventDefault(); vote(c); }
    };
    document.addEventListener("keydown", onKey);
    leave.push(() => document.removeEventListener("keydown", onKey));
    $("#startj").onclick = async () => {
      $("#err").textContent = ""; $("#pair").innerHTML = "<p>generating both models' answers...</p>";
      try { state = await api(`/v1/studio/runs/${encodeURIComponent(name)}/judge`, {method: "POST", body: {n: Number($("#npairs").value)}}); render(); }
      catch (e) { $("#err").textContent = e.message; }
    };
    $("#exportj").onclick = (e) => { e.preventDefault(); download(`/v1/studio/runs/${encodeURIComponent(name)}/judgements.jsonl`, `${name}-judgements.jsonl`); };
    $("#importj").onchange = async () => {
      const f = $("#importj").files[0];
      if (!f) return;
      $("#importmsg").innerHTML = "<span class='dim'>checking every line...</span>";
      try {
        const r = await api(`/v1/studio/runs/${encodeURIComponent(name)}/judgements`, {method: "POST", body: {filename: f.name, content: await f.text()}});
        $("#importmsg").innerHTML = `<span class="ok">${esc(f.name)}: ${r.read} judgements read, ${r.imported} imported, ${r.already_there} already here; ${r.total} in all</span>`;
        state = await api(`/v1/studio/runs/${encodeURIComponent(name)}/judge`); render(); await showLoop();
      } catch (e) { $("#importmsg").innerHTML = `<pre class="error">${esc(e.message)}</pre>`; }
      $("#importj").value = "";
    };
    const showLoop = async () => {
      const lin = await api(`/v1/studio/runs/${encodeURIComponent(name)}/lineage`);
      const me = lin.data[lin.data.length - 1], parent = lin.data.length > 1 ? lin.data[lin.data.length - 2] : null;
      if (me && me.judgements_of && parent) {
        $("#pairabout").innerHTML = `This run learned from the judgements of <a href="#/judge/${encodeURIComponent(me.judgements_of)}">${esc(me.judgements_of)}</a>:
          a new set of pairs compares it with its parent <b>${esc(parent.model)}</b> on held-out prompts those judgements did not use.`;
      } else if (parent) {
        $("#pairabout").textContent = `A new set of pairs compares this run's model with ${parent.model} on held-out prompts not judged yet.`;
      }
      $("#children").innerHTML = lin.children.length ? `<h2>Children of these judgements</h2><ul>${lin.children.map(c =>
        `<li><a href="#/run/${encodeURIComponent(c.run)}" class="child">${esc(c.run)}</a> &middot; ${esc(c.method)} &middot;
         <span class="status ${esc(c.status)}">${esc(c.status)}</span>${c.status !== "succeeded" ? "" : c.method === "reward"
           ? ` &middot; step 2: <a href="#/new">GRPO from this model with it</a> (New run: objective <i>RL from rewards</i>, a reward of kind <i>model</i> with path <code>runs/${esc(c.run)}</code>)`
           : ` &middot; <a href="#/judge/${encodeURIComponent(c.run)}">judge it against this model</a>`}</li>`).join("")}</ul>` : "";
    };
    $("#trainj").onclick = async () => {
      $("#looperr").textContent = "";
      const body = {method: $("#loopmethod").value};
      if ($("#loopepochs").value.trim()) body.hyperparameters = {n_epochs: Number($("#loopepochs").value)};
      try {
        const job = await api(`/v1/studio/runs/${encodeURIComponent(name)}/train-on-judgements`, {method: "POST", body});
        location.hash = `#/run/${job.tunesmith.run}`;
      } catch (e) { $("#looperr").textContent = e.message; }
    };
    state = await api(`/v1/studio/runs/${encodeURIComponent(name)}/judge`); render();
    await showLoop();
  },
};

// a run's lineage (base -> v1 -> v2 ...), each generation with its record against its parent
function winText(w) {
  if (!w) return "<span class='dim'>not judged against its parent yet</span>";
  if (w.win_rate == null) return `${w.ties} ties, nothing decided`;
  return `<b class="winrate">${(100 * w.win_rate).toFixed(0)} %</b> (95 % interval ${(100 * w.ci95[0]).toFixed(0)}-${(100 * w.ci95[1]).toFixed(0)} %)
    &middot; ${w.wins} wins, ${w.losses} losses, ${w.ties} ties &middot; sign test p = ${Number(w.p_sign_test).toPrecision(3)}`;
}
async function showLineage(name) {
  const lin = await api(`/v1/studio/runs/${encodeURIComponent(name)}/lineage`);
  if (!$("#lineagebox")) return;  // the page was left meanwhile
  const gens = lin.data;
  $("#lineagebox").hidden = gens.length < 2 && !lin.children.length;
  $("#lineage").innerHTML = `<thead><tr><th>generation</th><th>model</th><th>learned from</th><th>win rate over its parent</th></tr></thead><tbody>
    ${gens.map((g, i) => `<tr class="gen${g.run === name ? " here" : ""}" data-gen="${i}">
      <td>${i === 0 && !g.run ? "base" : "v" + i}</td>
      <td>${g.run ? `<a href="#/run/${encodeURIComponent(g.run)}">${esc(g.run)}</a>${g.model !== g.run ? `<div class="dim">${esc(g.model)}</div>` : ""}` : esc(g.model)}</td>
      <td>${g.judgements_of ? `<a href="#/judge/${encodeURIComponent(g.judgements_of)}">judgements of ${esc(g.judgements_of)}</a>` : (g.parent ? "its training data" : "")}</td>
      <td>${g.parent ? winText(g.vs_parent) + (g.run && g.status === "succeeded" ? ` &middot; <a href="#/judge/${encodeURIComponent(g.run)}">judge vs parent</a>` : "") : ""}</td></tr>`).join("")}
    ${lin.children.map(c => `<tr class="gen child"><td>v${gens.length}</td><td><a href="#/run/${encodeURIComponent(c.run)}">${esc(c.run)}</a>
      <div class="dim">${esc(c.model || "")}</div></td><td>judgements of ${esc(name)} (${esc(c.method)})</td>
      <td><span class="status ${esc(c.status)}">${esc(c.status)}</span></td></tr>`).join("")}</tbody>`;
  $("#lineage").dataset.generations = gens.length;
}

async function download(path, filename) {
  const r = await fetch(path, {headers: headers()});
  const url = URL.createObjectURL(await r.blob());
  const a = document.createElement("a"); a.href = url; a.download = filename; a.click();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}
async function openReport(name) {  // fetched with the key, shown from a blob (its images are inline)
  const r = await fetch(`/v1/studio/runs/${encodeURIComponent(name)}/files/report.html`, {headers: headers()});
  window.open(URL.createObjectURL(new Blob([await r.text()], {type: "text/html"})), "_blank");
}

async function route() {
  leave.forEach(f => f()); leave = [];
  const token = ++shown;  // a page drawn only while it is still the current route (api() drops the others' answers)
  const [, page = "runs", arg = ""] = (location.hash || "#/runs").split("/");
  document.querySelectorAll("nav a").forEach(a => a.classList.toggle("here", a.getAttribute("href") === `#/${page}`));
  main.innerHTML = "<p class='dim'>loading...</p>";
  try { await (pages[page] || pages.runs)(decodeURIComponent(arg)); }
  catch (e) { if (token === shown) main.innerHTML = `<p class="error">${esc(e.message)}</p>`; }
  if (token !== shown) return;
  main.dataset.page = page;
  main.focus({preventScroll: true});
}
$("#apikey").value = key();
$("#apikey").onchange = () => { sessionStorage.setItem("tunesmith-key", $("#apikey").value); route(); };
window.addEventListener("hashchange", route);
route();
