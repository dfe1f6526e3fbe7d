// ddm ui: the page's script. Every value from the server is set as text (never as HTML).
"use strict";

const $ = (id) => document.getElementById(id);

function el(tag, props = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") e.className = v;
    else if (k === "dataset") Object.assign(e.dataset, v);
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

async function api(url, options = {}) {
  const r = await fetch(url, { credentials: "same-origin", ...options });
  const body = await r.json().catch(() => ({ error: `${r.status} ${r.statusText}` }));
  if (!r.ok) throw new Error(body.error || `${r.status} ${r.statusText}`);
  return body;
}

const fmt = {
  num: (v, d = 3) => (v === null || v === undefined ? "–" : Number(v).toPrecision(d)),
  bytes: (b) => (b >= 1 << 20 ? `${(b / (1 << 20)).toFixed(1)} MiB` : `${(b / 1024).toFixed(1)} KiB`),
  secs: (s) => {
    if (s === null || s === undefined) return "–";
    if (s < 90) return `${s.toFixed(0)} s`;
    if (s < 5400) return `${(s / 60).toFixed(1)} min`;
    return `${(s / 3600).toFixed(1)} h`;
  },
};

let overview = {};

async function start() {
  overview = await api("/api/overview");
  $("where").textContent = [overview.runs, overview.registry].filter(Boolean).join(" · ");
  $("islands-panel").hidden = !overview.runs;
  $("partition-panel").hidden = !overview.partition;
  $("registry-panel").hidden = !overview.registry;
  $("sample-panel").hidden = !overview.registry;
  $("router-panel").hidden = !overview.router_eval;
  $("prompt-label").hidden = !overview.prompts;
  if (overview.runs) {
    refreshIslands();
    setInterval(refreshIslands, 2000);
  }
  if (overview.partition) loadPartition().catch((e) => ($("partition-note").textContent = e.message));
  if (overview.registry) loadRegistry().catch((e) => ($("registry-note").textContent = e.message));
  if (overview.router_eval) {
    $("router-curve").src = "/api/router.svg";
    $("router-curve").hidden = false;
    $("router-note").textContent = `Accuracy and calibration error (ECE) per noise level, from ${overview.router_eval}.`;
  }
}

// Islands: one card each, updated in place; the loss curve reloads when the step moves.
async function refreshIslands() {
  let list;
  try {
    list = await api("/api/islands");
  } catch (e) {
    $("islands-note").textContent = e.message;
    return;
  }
  $("islands-note").textContent = list.length
    ? `${list.length} islands in ${overview.runs}, read every 2 s.`
    : `No island in ${overview.runs} yet.`;
  for (const p of list) {
    let card = document.querySelector(`.card[data-name="${CSS.escape(p.name)}"]`);
    if (!card) {
      card = el("div", { class: "card", dataset: { name: p.name } },
        el("h3", {}, el("span", { class: "name" }, p.name), el("span", { class: "state" })),
        el("div", { class: "facts" }),
        el("img", { class: "loss", alt: `loss of ${p.name}`, hidden: "" }),
        el("img", { class: "samples", alt: `samples of ${p.name}`, hidden: "" }));
      $("islands").append(card);
    }
    const state = card.querySelector(".state");
    state.textContent = p.state;
    state.className = `state state-${p.state}`;
    const facts = [
      el("span", { class: "step", dataset: { step: p.step } }, `step ${p.step}${p.steps ? " / " + p.steps : ""}`),
      ` · loss ${fmt.num(p.loss, 4)}`,
      p.img_per_s ? ` · ${p.img_per_s.toFixed(0)} img/s` : "",
      p.eta_s !== null ? ` · ETA ${fmt.secs(p.eta_s)}` : "",
      p.checkpoint_step !== null ? ` · saved at step ${p.checkpoint_step}` : "",
      p.checkpoint ? ` · ${p.checkpoint}` : "",
      p.diverged_at !== null ? ` · loss not finite at step ${p.diverged_at}` : "",
    ];
    card.querySelector(".facts").replaceChildren(...facts);
    const loss = card.querySelector("img.loss");
    if (p.loss_points > 1 && loss.dataset.step !== String(p.step)) {
      loss.dataset.step = p.step;
      loss.src = `/api/islands/${encodeURIComponent(p.name)}/loss.svg?step=${p.step}`;
      loss.hidden = false;
    }
    const samples = card.querySelector("img.samples");
    if (p.samples && samples.dataset.file !== p.samples) {
      samples.dataset.file = p.samples;
      samples.src = `/api/islands/${encodeURIComponent(p.name)}/samples.png?file=${encodeURIComponent(p.samples)}`;
      samples.hidden = false;
    }
  }
}

// Partition: size, prior and the classes each cluster holds most of.
async function loadPartition() {
  const p = await api("/api/partition");
  const names = p.class_names || [];
  $("partition-note").textContent = `${p.k} clusters of ${p.dataset || "the data"}.`;
  const rows = [el("tr", {}, el("th", {}, "cluster"), el("th", {}, "samples"), el("th", {}, "prior"), el("th", {}, "classes it holds most"))];
  for (const c of p.clusters || []) {
    const counts = c.label_counts || [];
    const total = counts.reduce((a, b) => a + b, 0) || 1;
    const top = counts.map((n, i) => [n, i]).sort((a, b) => b[0] - a[0]).slice(0, 3).filter(([n]) => n > 0)
      .map(([n, i]) => `${names[i] || "class " + i} ${(100 * n / total).toFixed(0)}%`).join(", ");
    rows.push(el("tr", { class: "cluster" }, el("td", {}, c.id), el("td", { class: "num" }, c.count),
      el("td", { class: "num" }, Number(c.prior).toFixed(3)), el("td", {}, top || "–")));
  }
  $("clusters").replaceChildren(...rows);
  if (p.has_grid) {
    $("partition-grid").src = "/api/partition/clusters.png";
    $("partition-grid").hidden = false;
  }
}

// Registry: every checkpoint; served experts say whether their server answers.
let classNames = [];
async function loadRegistry() {
  const r = await api("/api/registry");
  classNames = r.class_names || [];
  const missing = r.missing.length ? ` Missing: experts ${r.missing.join(", ")}.` : "";
  $("registry-note").textContent =
    `${r.experts.length} of ${r.k} experts, data ${JSON.stringify(r.data_shape)}` +
    (r.latent ? `, ${r.latent}` : "") + (r.text ? `, ${r.text}` : "") + "." + missing;
  const head = el("tr", {}, ...["", "model", "parameters", "GFLOPs / forward", "objective", "conditioning", "prior", "size", "sha256", "where"].map((h) => el("th", {}, h)));
  const row = (e, cls) => {
    const s = e.summary || {};
    const where = e.served_at
      ? el("span", { class: e.answers ? "good" : "bad" }, `${e.served_at} ${e.answers ? "answers" : "does not answer"}`)
      : e.source;
    return el("tr", { class: cls }, el("td", {}, e.what), el("td", {}, s.model || "–"),
      el("td", { class: "num" }, s.parameters ? s.parameters.toLocaleString("en") : "–"),
      el("td", { class: "num" }, s.gflops_per_forward !== undefined ? s.gflops_per_forward.toFixed(3) : "–"),
      el("td", {}, s.objective || "–"), el("td", {}, e.conditioning),
      el("td", { class: "num" }, e.prior !== null ? e.prior.toFixed(3) : ""),
      el("td", { class: "num" }, fmt.bytes(e.bytes)), el("td", {}, el("code", {}, e.sha256.slice(0, 12))),
      el("td", {}, where, e.problem ? el("div", { class: "bad" }, e.problem) : ""));
  };
  const rows = [head, ...r.experts.map((e) => row(e, "expert"))];
  if (r.router) rows.push(row(r.router, "router"));
  if (r.vae) rows.push(row(r.vae, "vae"));
  $("registry").replaceChildren(...rows);
  const select = $("class");
  select.replaceChildren(el("option", { value: "" }, "none"));
  if (classNames.length || r.experts.some((e) => e.conditioning.startsWith("class"))) {
    select.append(el("option", { value: "all" }, "all (one column each)"));
    classNames.forEach((name, i) => select.append(el("option", { value: String(i) }, `${i}: ${name}`)));
  }
}

$("verify").addEventListener("click", async () => {
  $("verify-result").textContent = "verifying…";
  try {
    const v = await api("/api/registry/verify", { method: "POST" });
    $("verify-result").className = v.ok ? "good" : "bad";
    $("verify-result").textContent = v.ok ? "every checkpoint verified" : v.problems.join("; ");
  } catch (e) {
    $("verify-result").className = "bad";
    $("verify-result").textContent = e.message;
  }
});

// Sampling: the settings of `ddm sample`; the grid and which experts ran per step range.
$("sample-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const f = new FormData(ev.target);
  const body = {
    n: Number(f.get("n")), steps: Number(f.get("steps")), solver: f.get("solver"),
    schedule: f.get("schedule") || null, strategy: f.get("strategy") || null, router: f.get("router"),
    class: f.get("class") || null, guidance: Number(f.get("guidance")), seed: Number(f.get("seed")),
    precision: f.get("precision"),
  };
  if (overview.prompts && f.get("prompt")) body.prompt = f.get("prompt");
  $("sample-status").className = "muted";
  $("sample-status").textContent = "drawing…";
  $("draw").disabled = true;
  try {
    const a = await api("/api/sample", {
      method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body),
    });
    $("sample-grid").src = `data:image/png;base64,${a.png_base64}`;
    $("sample-grid").hidden = false;
    const r = a.report;
    $("sample-status").textContent =
      `drawn: ${r.n} samples, ${r.steps} ${r.solver} steps, strategy ${r.strategy}, ` +
      `${a.seconds_per_image.toFixed(3)} s and ${a.expert_evaluations_per_image.toFixed(1)} expert evaluations per image` +
      (r.guidance && r.guidance !== 1 ? " (each a conditional and a null forward: guidance)" : "");
    showUsage(r);
  } catch (e) {
    $("sample-status").className = "bad";
    $("sample-status").textContent = e.message;
  } finally {
    $("draw").disabled = false;
  }
});

function showUsage(r) {
  const k = r.usage.length ? r.usage[0].rows_per_expert.length : 0;
  const most = Math.max(1, ...r.usage.flatMap((u) => u.rows_per_expert));
  const head = el("tr", {}, el("th", {}, "steps from t"), ...Array.from({ length: k }, (_, i) => el("th", {}, `expert ${i}`)));
  const rows = r.usage.map((u) => el("tr", {}, el("td", {}, `${u.t_from.toFixed(2)} → ${u.t_to.toFixed(2)}`),
    ...u.rows_per_expert.map((n) => el("td", { class: "num" }, el("span", { class: "bar", style: `width:${(40 * n / most).toFixed(1)}px` }), ` ${n}`))));
  $("usage").replaceChildren(el("p", { class: "muted" }, "Samples each expert ran on, summed over the steps of each range:"), el("table", { id: "usage-table" }, head, ...rows));
}

start().catch((e) => ($("where").textContent = e.message));
