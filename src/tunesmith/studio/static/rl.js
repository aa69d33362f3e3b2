// Online RL in the studio's page: the New-run form's reward-model and GRPO / RLOO choices (rewards of the built-in
// kinds with weights, group size, KL, length cap) with the headroom check before a launch, and a running RL job's
// panel: the charts the rl task declares after the run page's first three (catalog.RL_SHOWS: shares, answer length,
// entropy and KL, speed; drawn from the run's metrics rows) and the alarms
// evaluate/alarms.py raises over them. Plain JavaScript over the studio's HTTP API (studio/routers/rl.py); app.js
// calls window.tunesmithRL.form / .settings / .runPage, and this file uses app.js's helpers ($, esc, api, fmt) when
// those are called, so it is loaded before app.js.
"use strict";

window.tunesmithRL = (() => {
  let rlOpts = null;

  // ---------------------------------------------------------------- the New-run form
  const FIELD = {  // a reward's settings on the form: [config field, label, placeholder, type]
    column: ["column", "column", "the record's answer", "text"],
    pattern: ["pattern", "pattern", "#### -?[0-9]+", "text"],
    min_words: ["min_words", "min words", "", "number"],
    max_words: ["max_words", "max words", "", "number"],
    path: ["path", "path", "runs/NAME (a reward-model run) or a model under --models", "text"],
  };

  function rewardRow(kind = "numeric", weight = 1, values = {}) {
    const kinds = rlOpts.reward_kinds;
    const spec = kinds.find(k => k.kind === kind) || kinds[0];
    const tr = document.createElement("tr");
    tr.className = "rlreward";
    tr.innerHTML = `<td><select class="rkind" aria-label="reward kind">${kinds.map(k =>
        `<option ${k.kind === spec.kind ? "selected" : ""}>${esc(k.kind)}</option>`).join("")}</select></td>
      <td><input class="rweight" type="number" step="0.1" value="${esc(weight)}" aria-label="weight" style="width:80px"></td>
      <td class="rfields">${spec.fields.map(f => `<input class="rfield" data-field="${f}" type="${FIELD[f][3]}"
        placeholder="${esc(FIELD[f][1])}${FIELD[f][2] ? ": " + esc(FIELD[f][2]) : ""}" aria-label="${esc(FIELD[f][1])}"
        value="${esc(values[f] ?? "")}"${f === "path" && spec.kind === "model" ? ' list="rlrewardruns"' : ""}>`).join("")}</td>
      <td><button class="rdel" type="button" aria-label="remove this reward">&times;</button></td>`;
    tr.querySelector(".rkind").onchange = (e) => tr.replaceWith(rewardRow(e.target.value, tr.querySelector(".rweight").value));
    tr.querySelector(".rdel").onclick = () => tr.remove();
    return tr;
  }

  function rewards() {  // rl.rewards as the form has them
    return [...document.querySelectorAll("#rlrewards .rlreward")].map(tr => {
      const r = {kind: tr.querySelector(".rkind").value, weight: Number(tr.querySelector(".rweight").value || 1)};
      tr.querySelectorAll(".rfield").forEach(i => {
        if (i.value.trim() !== "") r[i.dataset.field] = i.type === "number" ? Number(i.value) : i.value.trim();
      });
      return r;
    });
  }

  async function form(opts, settings) {
    try { rlOpts = opts.rl || await api("/v1/studio/rl/options"); } catch (e) { return; }  // a studio without RL routes
    const d = rlOpts.defaults;
    const objective = $("#objective");
    objective.insertAdjacentHTML("beforeend", `<option value="reward">reward model (preference pairs: task=reward)</option>
      <option value="rl">RL from rewards: GRPO / RLOO (prompts: task=rl)</option>`);
    objective.insertAdjacentHTML("afterend", `<div id="rlbox" class="rlbox" hidden>
      <div class="grid3">
        <div><label for="rlalgo">Algorithm</label><select id="rlalgo">${rlOpts.algorithms.map(a =>
          `<option ${a === d.algorithm ? "selected" : ""}>${esc(a)}</option>`).join("")}</select></div>
        <div><label for="rlgroup">Group size (answers per prompt)</label><input id="rlgroup" type="number" min="2" value="${d.group_size}"></div>
        <div><label for="rlbeta">KL weight (rl.beta; 0: off)</label><input id="rlbeta" type="number" min="0" step="0.01" value="${d.beta}"></div>
        <div><label for="rlcap">Length cap (rl.max_new_tokens)</label><input id="rlcap" type="number" min="1" value="${d.max_new_tokens}"></div>
      </div>
      <label>Rewards, summed with their weights${rlOpts.allow_code ? "" : ` <span class="dim">(Python reward functions: only on a studio started with --allow-code)</span>`}</label>
      <datalist id="rlrewardruns">${(rlOpts.reward_runs || []).map(r => `<option value="${esc(r)}">`).join("")}</datalist>
      <table id="rlrewards"><thead><tr><th>kind</th><th>weight</th><th>settings</th><th></th></tr></thead><tbody></tbody></table>
      <div class="row"><button id="rladd" type="button">Add a reward</button></div>
      <label>Headroom before launch: the start model's greedy answer (pass@1) against the best of K samples (pass@K)</label>
      <div class="row"><label style="margin:0">prompts <input id="hrprompts" type="number" min="1" max="16" value="8" style="width:70px"></label>
        <label style="margin:0">K <input id="hrsamples" type="number" min="2" max="16" value="8" style="width:70px"></label>
        <button id="headroom" type="button">Check headroom</button></div>
      <pre id="headroomout" class="dim">RL can only raise answers the model already samples: check before launching.</pre>
    </div>`);
    $("#rlrewards tbody").append(rewardRow("numeric", 1, {column: "answer"}));
    $("#rladd").onclick = () => $("#rlrewards tbody").append(rewardRow("regex", 0.2));
    objective.addEventListener("change", () => { $("#rlbox").hidden = objective.value !== "rl"; });
    $("#headroom").onclick = async () => {
      const out = $("#headroomout");
      out.className = "dim"; out.textContent = "sampling (bounded: at most 16 prompts x 16 samples)...";
      try {
        const h = await api("/v1/studio/headroom", {method: "POST", body: {...settings(), prompts: Number($("#hrprompts").value),
                                                                             samples: Number($("#hrsamples").value)}});
        out.className = h.warnings.length ? "warn" : "";
        out.textContent = `${h.prompts} held-out prompts, greedy + ${h.samples} samples at temperature ${h.temperature}, ` +
          `up to ${h.max_new_tokens} tokens:\n${h.text}` + h.warnings.map(w => `\nwarning: ${w}`).join("");
        out.dataset.done = "1";
      } catch (e) { out.className = "error"; out.textContent = e.message; }
    };
  }

  function settings(s) {  // the form's settings with the objective's task and rl.* keys (the user's own lines win)
    const objective = $("#objective") && $("#objective").value;
    if (objective === "reward") return {...s, method: "supervised", overrides: ["task=reward", ...s.overrides]};
    if (objective !== "rl") return s;
    const rl = ["task=rl", `rl.algorithm=${$("#rlalgo").value}`, `rl.rewards=${JSON.stringify(rewards())}`,
                `rl.group_size=${$("#rlgroup").value}`, `rl.beta=${$("#rlbeta").value}`, `rl.max_new_tokens=${$("#rlcap").value}`];
    return {...s, method: "supervised", overrides: [...rl, ...s.overrides]};
  }

  // ---------------------------------------------------------------- a run's RL panel
  const CHART_CFG = {displayModeBar: false, responsive: true};

  function traces(chart, rows) {  // one trace per curve (a `*` in its key: one per matching key), from the rows
    const kept = chart.skip ? rows.filter(r => !r[chart.skip]) : rows;
    const out = [];
    for (const c of chart.curves) {
      let keys = [[c.key, c.label]];
      if (c.key.includes("*")) {
        const re = new RegExp("^" + c.key.split("*").map(p => p.replace(/[.*+?^${}()|[\]\\/]/g, "\\$&")).join("([^/]+)") + "$");
        const found = new Set(); rows.forEach(r => Object.keys(r).forEach(k => { const m = k.match(re); if (m) found.add(k + "\u0000" + m[1]); }));
        keys = [...found].map(x => x.split("\u0000")).map(([k, part]) => [k, c.label === "*" ? part : `${c.label} ${part}`]);
      }
      for (const [key, label] of keys) {
        const pts = (c.held_out ? rows : kept).filter(r => r[key] != null && r.step != null);
        if (!pts.length) continue;
        out.push({x: pts.map(r => r.step), y: pts.map(r => r[key]), name: label, mode: c.held_out ? "lines+markers" : "lines",
                  line: c.dashed ? {dash: "dot"} : {}});
      }
    }
    return out;
  }

  function layout(chart, data) {
    const l = {title: {text: chart.title, font: {size: 14}}, margin: {l: 50, r: 10, t: 34, b: 36},
               xaxis: {zeroline: false}, yaxis: {title: {text: chart.y}}, legend: {orientation: "h"}};  // x: the step
    if (chart.share) l.yaxis.range = [0, 1.05];
    if (chart.curves.some(c => c.key === "completion_length")) {  // the cap the answers are cut at
      const cap = data.settings.max_new_tokens;
      l.shapes = [{type: "line", xref: "paper", x0: 0, x1: 1, y0: cap, y1: cap, line: {dash: "dash", color: "#cf222e", width: 1}}];
      l.annotations = [{xref: "paper", x: 1, y: cap, xanchor: "right", yanchor: "bottom", text: `cap ${cap}`, showarrow: false,
                        font: {size: 11, color: "#cf222e"}}];
      l.yaxis.range = [0, cap * 1.1];
    }
    return l;
  }

  const ALARM_TITLES = {reward_up_heldout_down: "reward up, held-out quality down", length_at_cap: "answers at the length cap",
                        kl_past_bound: "KL past its bound", groups_flat: "most groups flat"};

  function render(data) {
    const box = $("#rlpanel");
    if (!box) return;
    box.hidden = false;
    const s = data.settings;
    $("#rlsettings").textContent = `${s.algorithm}, ${s.group_size} answers per prompt, KL weight ${s.beta}, cap ${s.max_new_tokens} tokens; ` +
      `rewards: ${s.rewards.map(r => `${r.name} x ${r.weight}`).join(", ")}`;
    $("#rlalarms").innerHTML = data.alarms.length
      ? data.alarms.map(a => `<div class="alarm" data-kind="${esc(a.kind)}"><b>${esc(ALARM_TITLES[a.kind] || a.kind)}</b>
          <span class="dim">(step ${a.step})</span><div>${esc(a.message)}</div></div>`).join("")
      : `<p class="ok" id="rlquiet">No alarms: reward vs held-out, length vs cap, KL vs ${data.kl_bound} nats per answer, flat groups all within bounds.</p>`;
    $("#rlalarms").dataset.n = data.alarms.length;
    const head = data.rows.find(r => Object.keys(r).some(k => k.startsWith("headroom_")));
    $("#rlheadroom").textContent = head ? headroomLine(head) : "";
    const charts = data.shows.charts.slice(3);  // the first three (the reward per reward function first) are app.js's grid
    const grid = $("#rlcharts");
    if (grid.children.length !== charts.length) {
      grid.innerHTML = charts.map((c, i) => `<div class="card"><div id="rlchart${i}" class="chart" data-title="${esc(c.title)}"></div></div>`).join("");
    }
    charts.forEach((c, i) => {
      const t = traces(c, data.rows);
      Plotly.react(`rlchart${i}`, t, layout(c, data), CHART_CFG);
      $(`#rlchart${i}`).dataset.points = t.length ? t[0].x.length : 0;
      $(`#rlchart${i}`).dataset.traces = t.map(x => x.name).join("|");
    });
  }

  function runPage(name, leave) {
    const anchor = $("#exportbox");
    if (!anchor) return;
    anchor.insertAdjacentHTML("beforebegin", `<section id="rlpanel" hidden><h2>Reinforcement learning</h2>
      <p id="rlsettings" class="dim"></p><div id="rlalarms" role="alert"></div><p id="rlheadroom" class="dim"></p>
      <div id="rlcharts" class="grid"></div></section>`);
    let timer = null, done = false;
    const poll = async () => {
      if (done || !$("#rlpanel")) return;
      try {
        const data = await api(`/v1/studio/runs/${encodeURIComponent(name)}/rl`);
        if (data.task && data.task !== "rl") { done = true; return; }  // not an RL run: no panel
        if (data.task === "rl") render(data);
        if (data.finished) done = true;
      } catch (e) { /* the next poll tries again */ }
    };
    poll();
    timer = setInterval(poll, 3000);
    leave.push(() => clearInterval(timer));
  }

  return {form, settings, runPage};
})();

// The run's headroom row in words: pass@1 (greedy) against pass@K (K samples) per 0/1 reward, and the greedy answer's
// reward against the best of K for the total.
function headroomLine(head) {
  const h = k => head["headroom_" + k], K = h("samples"), pct = v => `${(100 * v).toFixed(0)} %`;
  const rewards = Object.keys(head).filter(k => /^headroom_.+_pass_at_1$/.test(k)).map(k => k.slice(9, -10));
  const parts = rewards.map(r => `${r} pass@1 ${pct(h(`${r}_pass_at_1`))} vs pass@${K} ${pct(h(`${r}_pass_at_${K}`))}`);
  if (h("reward_greedy") != null) parts.push(`total reward ${fmt(h("reward_greedy"))} greedy vs ${fmt(h(`reward_best_of_${K}`))} best of ${K}`);
  return `headroom before training (${h("prompts")} held-out prompts, ${K} samples each): ${parts.join("; ")}` +
    (h("warnings") ? " -- see the log's warning" : "");
}
