// subtomo GUI: small vanilla helpers for the server-rendered pages (no external libraries).
"use strict";

async function postJSON(url, body) {
  const response = await fetch(url, {method: "POST", headers: {"Content-Type": "application/json"},
                                     body: JSON.stringify(body), credentials: "same-origin"});
  let data = {};
  try { data = await response.json(); } catch (e) { data = {error: await response.text()}; }
  return {status: response.status, data: data};
}

function el(tag, attrs, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined && text !== null) node.textContent = text;
  return node;
}

function jobLink(name) { return "/job?name=" + encodeURIComponent(name); }

async function abortJob(name) {
  if (!confirm("Abort " + name + "? The job is marked failed and can be continued where supported.")) return;
  const r = await postJSON("/api/abort", {job: name});
  if (r.status !== 200) alert(r.data.error || r.data.detail || "abort failed");
}

function bindAbort(root) {
  root.querySelectorAll("button.abort, button#abort").forEach(b => { b.onclick = () => abortJob(b.dataset.job); });
}

// ---------------------------------------------------------------- job list (index page)
function renderJobRows(rows) {
  const body = document.querySelector("#jobs tbody");
  body.innerHTML = "";
  if (!rows.length) { body.appendChild(el("tr")).appendChild(el("td", {colspan: 5, class: "muted"}, "No jobs yet.")); return; }
  for (const r of rows) {
    const tr = el("tr", {"data-job": r.name, class: "status-" + r.status.toLowerCase()});
    const a = el("a", {href: jobLink(r.name)}, r.name);
    tr.appendChild(el("td")).appendChild(a);
    tr.appendChild(el("td", {}, r.job_type));
    tr.appendChild(el("td", {class: "state"}, r.status));
    const cell = el("td");
    const bar = el("progress", {max: 1});
    if (r.progress !== null) bar.value = r.progress;
    cell.appendChild(bar); cell.appendChild(el("span", {class: "muted"}, " " + r.progress_text));
    tr.appendChild(cell);
    const last = tr.appendChild(el("td"));
    if (r.status === "Running") last.appendChild(el("button", {class: "abort", "data-job": r.name}, "Abort"));
    body.appendChild(tr);
    if (r.status === "Running" && r.log_tail) {
      const tail = el("tr", {class: "tail", "data-tail": r.name});
      tail.appendChild(el("td", {colspan: 5})).appendChild(el("pre", {}, r.log_tail));
      body.appendChild(tail);
    }
  }
  bindAbort(body);
}

function liveJobList() {
  bindAbort(document);
  let known = document.querySelectorAll("#jobs tbody tr[data-job]").length;
  setInterval(async () => {
    const response = await fetch("/api/jobs", {credentials: "same-origin"});
    if (!response.ok) return;
    const rows = await response.json();
    renderJobRows(rows);
    if (rows.length !== known) { known = rows.length; refreshGraph(); }
  }, 1500);
}

async function refreshGraph() {
  const response = await fetch("/", {credentials: "same-origin"});
  const html = new DOMParser().parseFromString(await response.text(), "text/html");
  const fresh = html.querySelector(".graph");
  if (fresh) document.querySelector(".graph").innerHTML = fresh.innerHTML;
}

// ---------------------------------------------------------------- job page
function liveJob() {
  bindAbort(document);
  const name = document.getElementById("job-title").dataset.job;
  let status = document.getElementById("job-status").textContent.trim();
  if (status !== "Running") return;
  const timer = setInterval(async () => {
    const response = await fetch("/api/job?name=" + encodeURIComponent(name), {credentials: "same-origin"});
    if (!response.ok) return;
    const data = await response.json();
    const badge = document.getElementById("job-status");
    badge.textContent = data.row.status; badge.className = "badge status-" + data.row.status.toLowerCase();
    const bar = document.getElementById("job-progress");
    if (data.row.progress !== null) bar.value = data.row.progress;
    document.getElementById("job-progress-text").textContent = data.row.progress_text;
    const log = document.getElementById("log");
    log.textContent = data.log; log.scrollTop = log.scrollHeight;
    if (data.errors) { const e = document.getElementById("errors"); e.hidden = false; e.textContent = data.errors; }
    if (data.row.status !== "Running") { clearInterval(timer); location.reload(); }
  }, 1000);
}

// ---------------------------------------------------------------- job form
function formValues(form) {
  const values = {};
  form.querySelectorAll("[name]").forEach(input => {
    const def = input.dataset.default || "";
    if (input.type === "checkbox") {
      const wasOn = ["True", "true"].includes(def);
      if (input.checked !== wasOn) values[input.name] = input.checked;
    } else if (input.tagName === "SELECT") {
      if (input.value !== def) values[input.name] = input.value;
    } else if (input.value.trim() !== "") {
      values[input.name] = input.value.trim();
    }
  });
  return values;
}

function showErrors(form, errors) {
  form.querySelectorAll(".error").forEach(e => { e.textContent = ""; });
  form.querySelectorAll(".field.invalid").forEach(f => f.classList.remove("invalid"));
  for (const [name, message] of Object.entries(errors || {})) {
    const box = document.getElementById("e-" + name) || document.getElementById("e-form");
    box.textContent = message;
    const field = form.querySelector('.field[data-field="' + name + '"]');
    if (field) {
      field.classList.add("invalid");
      const panel = field.closest(".tab-panel");
      if (panel) showTab(form, panel.dataset.panel);
    }
  }
}

function showTab(form, tab) {
  form.querySelectorAll(".tab").forEach(t => t.classList.toggle("active", t.dataset.tab === tab));
  form.querySelectorAll(".tab-panel").forEach(p => p.classList.toggle("active", p.dataset.panel === tab));
}

async function waitForJob(launchId, output) {
  for (;;) {
    await new Promise(r => setTimeout(r, 500));
    const response = await fetch("/api/launch/" + launchId, {credentials: "same-origin"});
    if (!response.ok) continue;
    const data = await response.json();
    if (data.job) { location.href = jobLink(data.job); return; }
    if (!data.alive) { output.hidden = false; output.textContent = data.output || "the job process ended without a job directory"; return; }
  }
}

function jobForm() {
  const form = document.getElementById("job-form");
  const command = form.dataset.command;
  form.querySelectorAll(".tab").forEach(t => { t.onclick = () => showTab(form, t.dataset.tab); });
  form.querySelectorAll("select.pick").forEach(s => {
    s.onchange = () => { if (s.value) { document.getElementById(s.dataset.for).value = s.value; validate(); } };
  });
  let pending = null;
  async function validate() {
    const r = await postJSON("/api/validate/" + command, {values: formValues(form)});
    showErrors(form, r.data.errors);
    return r.data;
  }
  form.querySelectorAll("[name]").forEach(i => {
    i.addEventListener("input", () => { clearTimeout(pending); pending = setTimeout(validate, 300); });
    i.addEventListener("change", validate);
  });
  document.getElementById("print-command").onclick = async () => {
    const data = await validate();
    document.getElementById("command").textContent = data.ok ? data.command : "";
  };
  document.getElementById("run-job").onclick = async () => {
    const r = await postJSON("/api/run/" + command, {values: formValues(form)});
    showErrors(form, r.data.errors);
    if (!r.data.ok) return;
    document.getElementById("command").textContent = r.data.command;
    document.getElementById("run-job").disabled = true;
    await waitForJob(r.data.launch, document.getElementById("launch-output"));
    document.getElementById("run-job").disabled = false;
  };
}

// ---------------------------------------------------------------- class selection
function classSelection() {
  const gallery = document.getElementById("gallery");
  const chosen = new Set();
  const list = document.getElementById("selected-list");
  gallery.querySelectorAll(".class-card").forEach(card => {
    const toggle = () => {
      const k = Number(card.dataset.class);
      if (chosen.has(k)) chosen.delete(k); else chosen.add(k);
      card.classList.toggle("selected", chosen.has(k));
      const sorted = [...chosen].sort((a, b) => a - b);
      list.textContent = sorted.length ? "Selected classes: " + sorted.join(",") : "No class selected.";
    };
    card.onclick = toggle;
    card.onkeydown = e => { if (e.key === " " || e.key === "Enter") { e.preventDefault(); toggle(); } };
  });
  document.getElementById("save-selection").onclick = async () => {
    const classes = [...chosen].sort((a, b) => a - b);
    if (!classes.length) { document.getElementById("e-form").textContent = "Click at least one class first."; return; }
    const r = await postJSON("/api/run/select", {values: {i: gallery.dataset.path, classes: classes.join(",")}});
    if (!r.data.ok) { document.getElementById("e-form").textContent = JSON.stringify(r.data.errors); return; }
    document.getElementById("command").textContent = r.data.command;
    await waitForJob(r.data.launch, document.getElementById("command"));
  };
}

// ---------------------------------------------------------------- STAR tables
function starTables(root) {
  fetch("/api/star?path=" + encodeURIComponent(root.dataset.path), {credentials: "same-origin"})
    .then(r => r.json()).then(tables => { for (const t of tables) root.appendChild(starTable(t)); });
}

function starTable(t) {
  const box = el("section", {class: "star-block", "data-block": t.name});
  box.appendChild(el("h3", {}, "data_" + t.name + " (" + t.total + " rows" + (t.rows.length < t.total ? ", first " + t.rows.length + " shown" : "") + ")"));
  const filter = box.appendChild(el("input", {type: "search", placeholder: "filter rows (text in any column)", class: "filter"}));
  const table = box.appendChild(el("table", {class: "star"}));
  const head = table.appendChild(el("thead")).appendChild(el("tr"));
  const body = table.appendChild(el("tbody"));
  let rows = t.rows.slice();
  let sortColumn = -1, ascending = true;
  function draw() {
    const needle = filter.value.toLowerCase();
    body.innerHTML = "";
    for (const row of rows) {
      if (needle && !row.some(c => String(c).toLowerCase().includes(needle))) continue;
      const tr = body.appendChild(el("tr"));
      for (const c of row) tr.appendChild(el("td", {}, c === null ? "" : (typeof c === "number" && !Number.isInteger(c) ? c.toPrecision(6) : c)));
    }
  }
  t.columns.forEach((name, j) => {
    const th = head.appendChild(el("th", {title: "click to sort"}, name));
    th.onclick = () => {
      ascending = sortColumn === j ? !ascending : false;  // first click: largest first (e.g. rlnClassDistribution)
      sortColumn = j;
      rows.sort((a, b) => { const x = a[j], y = b[j]; const r = (typeof x === "number" && typeof y === "number") ? x - y : String(x).localeCompare(String(y)); return ascending ? r : -r; });
      head.querySelectorAll("th").forEach(h => h.classList.remove("sorted-asc", "sorted-desc"));
      th.classList.add(ascending ? "sorted-asc" : "sorted-desc");
      draw();
    };
  });
  filter.oninput = draw;
  draw();
  return box;
}

// ---------------------------------------------------------------- maps: slices and isosurface
async function mapViewer(root) {
  const path = encodeURIComponent(root.dataset.path);
  const info = await (await fetch("/api/map/info?path=" + path, {credentials: "same-origin"})).json();
  const [nz, ny, nx] = info.shape;
  const sizes = {z: nz, y: ny, x: nx};
  document.getElementById("map-info").textContent = nz + "×" + ny + "×" + nx + " voxels, " + info.pixel_size_A.toFixed(2) + " Å/px";
  const lowBar = document.getElementById("low"), highBar = document.getElementById("high");
  const span = info.maximum - info.minimum || 1;
  const grey = bar => info.minimum + span * Number(bar.value) / 1000;
  lowBar.value = Math.round(1000 * (info.display_low - info.minimum) / span);  // robust range (percentiles)
  highBar.value = Math.round(1000 * (info.display_high - info.minimum) / span);
  function load(axis) {
    const bar = document.getElementById("index-" + axis);
    const img = document.getElementById("slice-" + axis);
    if (!bar) return;
    img.dataset.loading = "1";
    img.onload = () => { img.dataset.loading = ""; img.dataset.index = bar.value; };
    img.src = "/api/map/slice?path=" + path + "&axis=" + axis + "&index=" + bar.value + "&low=" + grey(lowBar) + "&high=" + grey(highBar);
    document.getElementById("label-" + axis).textContent = bar.value + " / " + (sizes[axis] - 1);
  }
  for (const axis of ["z", "y", "x"]) {
    const bar = document.getElementById("index-" + axis);
    if (!bar) continue;
    bar.max = sizes[axis] - 1;
    bar.value = root.dataset.kind === "stack" ? 0 : Math.floor(sizes[axis] / 2);
    bar.oninput = () => load(axis);
    load(axis);
  }
  lowBar.oninput = highBar.oninput = () => ["z", "y", "x"].forEach(load);
  const level = document.getElementById("level");
  if (!level) return;
  const surface = new SurfaceView(document.getElementById("surface"));
  let pending = null;
  async function mesh() {
    const value = info.minimum + span * Number(level.value) / 1000;
    document.getElementById("level-label").textContent = value.toPrecision(4);
    const t0 = performance.now();
    const response = await fetch("/api/map/mesh?path=" + path + "&level=" + value, {credentials: "same-origin"});
    const blob = await response.arrayBuffer();
    const n = surface.setMesh(blob);
    const shown = performance.now() - t0;
    const info2 = document.getElementById("mesh-info");
    info2.textContent = n + " triangles (marching cubes " + response.headers.get("X-Mesh-Seconds") + " s, shown in " + (shown / 1000).toFixed(3) + " s)";
    info2.dataset.triangles = n;
    info2.dataset.shownSeconds = (shown / 1000).toFixed(4);
  }
  level.value = Math.round(1000 * Math.min(0.99, (info.mean + 2 * info.std - info.minimum) / span));
  level.oninput = () => { clearTimeout(pending); pending = setTimeout(mesh, 150); };
  mesh();
}
