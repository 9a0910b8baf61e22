// virtstore's web page: every action is a call of the REST API (/openapi.json) with the
// bearer token the user logged in with. The token lives in sessionStorage (this tab only)
// and travels in the Authorization header, never in a cookie, so another site cannot
// make the browser send it (no CSRF). The DOM is built with textContent only: nothing
// from the server is ever parsed as HTML.

const $ = (sel) => document.querySelector(sel);
const state = {
  token: null, role: "ro", pools: [], pool: null, sort: "name", offset: 0,
  selected: null, jobs: new Map(), lastEvent: null, stream: null,
};

// -- the API ---------------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, code, message) { super(message); this.status = status; this.code = code; }
}

async function api(method, path, { json, xml, body, type, accept } = {}) {
  const headers = { Authorization: `Bearer ${state.token}` };
  if (json !== undefined) { headers["Content-Type"] = "application/json"; body = JSON.stringify(json); }
  if (xml !== undefined) { headers["Content-Type"] = "application/xml"; body = xml; }
  if (type) headers["Content-Type"] = type;
  if (accept) headers.Accept = accept;
  const resp = await fetch(path, { method, headers, body, cache: "no-store" });
  if (!resp.ok) {
    let code = "error", message = `${resp.status} ${resp.statusText}`;
    try { const e = (await resp.json()).error; code = e.code; message = e.message; } catch { /* not JSON */ }
    if (resp.status === 401 && path !== "/v1/version") logout(message);
    throw new ApiError(resp.status, code, message);
  }
  if (resp.status === 204) return null;
  const ctype = resp.headers.get("Content-Type") || "";
  return ctype.includes("json") ? resp.json() : resp.text();
}

const enc = encodeURIComponent;
const poolPath = (p) => `/v1/pools/${enc(p)}`;
const volPath = (p, v) => `${poolPath(p)}/volumes/${enc(v)}`;

// -- small DOM helpers -----------------------------------------------------------------
function el(tag, attrs = {}, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === false || v === null || v === undefined) continue;
    if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const k of kids) e.append(k);
  return e;
}

// A button that changes something is disabled for a read-only token (the server would
// refuse it anyway with 403).
function button(label, onclick, { write = true, name } = {}) {
  const b = el("button", { type: "button", text: label, "aria-label": name || null });
  if (write) { b.dataset.write = ""; b.disabled = state.role !== "rw"; }
  b.addEventListener("click", async () => {
    b.disabled = true;
    try { await onclick(); } catch (e) { report(e); } finally { b.disabled = write && state.role !== "rw"; }
  });
  return b;
}

function report(e, ok = false) {
  const s = $("#status");
  s.textContent = e instanceof Error ? `Error: ${e.message}` : String(e);
  s.className = ok ? "ok" : (e instanceof Error ? "error" : "");
  if (e instanceof Error && !(e instanceof ApiError)) console.error(e);
}

const UNITS = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
function size(n) {
  if (n === null || n === undefined) return "";
  let i = 0, v = n;
  while (v >= 1024 && i < UNITS.length - 1) { v /= 1024; i++; }
  return `${i ? v.toFixed(v < 10 ? 2 : 1) : v} ${UNITS[i]}`;
}

// "10G", "512M", "1.5T", "4096": binary units, as virsh reads them.
function parseSize(text) {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(?:i?b)?\s*$/i.exec(text);
  if (!m) throw new Error(`'${text}' is not a size (e.g. 10G, 512M, 4096)`);
  const exp = " kmgtp".indexOf((m[2] || " ").toLowerCase());
  return Math.round(parseFloat(m[1]) * 1024 ** exp);
}

function duration(s) {
  if (!isFinite(s) || s < 0) return "";
  s = Math.round(s);
  return s >= 3600 ? `${Math.floor(s / 3600)}h ${Math.floor(s / 60) % 60}m`
    : s >= 60 ? `${Math.floor(s / 60)}m ${s % 60}s` : `${s}s`;
}

function bar(used, total, label) {
  const p = el("progress", { max: String(Math.max(total, 1)), value: String(Math.min(used, total)),
    "aria-label": label });
  return p;
}

// -- login -----------------------------------------------------------------------------
async function login(token) {
  state.token = token;
  let info;
  try {
    info = await api("GET", "/v1/version");
  } catch (e) {
    state.token = null;
    $("#login-error").textContent = `Log in failed: ${e.message}`;
    return;
  }
  sessionStorage.setItem("virtstore-token", token);
  state.role = info.role;
  document.body.classList.toggle("ro", state.role !== "rw");
  $("#who").textContent = `virtstored ${info.version}: ${state.role === "rw" ? "read-write" : "read-only"} access`;
  $("#login").hidden = true;
  $("#app").hidden = false;
  $("#logout").hidden = false;
  for (const b of document.querySelectorAll("[data-write]")) b.disabled = state.role !== "rw";
  await Promise.all([loadPools(), loadJobs(), loadSecrets(), loadHost()]);
  followEvents();
}

function logout(why) {
  sessionStorage.removeItem("virtstore-token");
  state.token = null;
  if (state.stream) state.stream.abort();
  $("#app").hidden = true;
  $("#logout").hidden = true;
  $("#login").hidden = false;
  $("#who").textContent = "";
  $("#login-error").textContent = why || "";
  $("#token").focus();
}

// -- tabs ------------------------------------------------------------------------------
function showTab(name) {
  for (const b of document.querySelectorAll("nav button")) {
    if (b.dataset.tab === name) b.setAttribute("aria-current", "page");
    else b.removeAttribute("aria-current");
  }
  for (const s of document.querySelectorAll("#app > section")) s.hidden = s.id !== `tab-${name}`;
}

// -- pools -----------------------------------------------------------------------------
async function loadPools() {
  state.pools = await api("GET", "/v1/pools");
  const tbody = $("#pools-table tbody");
  tbody.replaceChildren(...state.pools.map(poolRow));
  const sel = $("#vq-pool");
  const keep = state.pool;
  sel.replaceChildren(...state.pools.filter((p) => p.state !== "inactive")
    .map((p) => el("option", { value: p.name, text: p.name })));
  if (keep && [...sel.options].some((o) => o.value === keep)) sel.value = keep;
  if (sel.value !== state.pool) { state.pool = sel.value || null; state.offset = 0; await loadVolumes(); }
}

function poolRow(p) {
  const running = p.state !== "inactive";
  const used = p.capacity ? Math.round(100 * p.allocation / p.capacity) : 0;
  const cap = el("td", {}, bar(p.allocation, p.capacity, `${p.name}: ${used}% allocated`),
    el("span", { class: "sizes", text: ` ${size(p.allocation)} used, ${size(p.available)} free of ${size(p.capacity)}` }));
  const act = (label, verb, body) => button(label, async () => {
    await api("POST", `${poolPath(p.name)}/${verb}`, body ? { json: body } : {});
    report(`Pool ${p.name}: ${label.toLowerCase()} done`, true);
    await loadPools();
  }, { name: `${label} pool ${p.name}` });
  const actions = el("td", { class: "actions" },
    running ? act("Stop", "stop") : act("Start", "start"),
    act("Refresh", "refresh"),
    act("Build", "build"),
    button("Delete storage", async () => {
      if (!confirm(`Delete the storage of pool ${p.name}?`)) return;
      await api("POST", `${poolPath(p.name)}/delete`); await loadPools();
    }, { name: `Delete storage of pool ${p.name}` }),
    button("Undefine", async () => {
      if (!confirm(`Undefine pool ${p.name}?`)) return;
      await api("DELETE", poolPath(p.name)); await loadPools();
    }, { name: `Undefine pool ${p.name}` }),
    act(p.autostart ? "Autostart off" : "Autostart on", "autostart", { autostart: !p.autostart }),
    button("XML", async () => {
      $("#pool-xml").textContent = await api("GET", `${poolPath(p.name)}/xml`);
      $("#pool-xml-h").textContent = `XML of pool ${p.name}`;
      $("#pool-xml-view").hidden = false;
    }, { write: false, name: `XML of pool ${p.name}` }),
    running ? button("Volumes", async () => {
      $("#vq-pool").value = p.name; state.pool = p.name; state.offset = 0;
      showTab("volumes"); await loadVolumes();
    }, { write: false, name: `Volumes of pool ${p.name}` }) : "");
  return el("tr", { "data-pool": p.name },
    el("th", { scope: "row", text: p.name }), el("td", { text: p.type }),
    el("td", { text: p.state }), el("td", { text: p.autostart ? "yes" : "no" }),
    el("td", { text: p.shared ? "yes" : "no" }), cap, actions);
}

// What each pool type's form asks for: [field, label, default].
const POOL_FIELDS = {
  dir: [["target", "Target directory", "/var/lib/virtstore/images"]],
  fs: [["device", "Source device", ""], ["format", "Filesystem", "auto"], ["target", "Mount point", ""]],
  netfs: [["host", "Server", ""], ["dir", "Exported directory", ""], ["format", "Protocol (nfs, glusterfs, cifs)", "nfs"], ["target", "Mount point", ""]],
  logical: [["srcname", "Volume group", ""], ["device", "Physical volume (to build)", ""]],
  disk: [["device", "Disk", ""], ["format", "Partition table (dos, gpt)", "gpt"], ["target", "Target", "/dev"]],
  iscsi: [["host", "Portal host", ""], ["device", "Target IQN", ""], ["target", "Target", "/dev/disk/by-path"]],
  "iscsi-direct": [["host", "Portal host", ""], ["device", "Target IQN", ""], ["initiator", "Initiator IQN", ""]],
  rbd: [["host", "Monitor host", ""], ["srcname", "Ceph pool", ""], ["auth_user", "Ceph user (optional)", ""], ["auth_secret", "Secret UUID (optional)", ""]],
  gluster: [["host", "Server", ""], ["srcname", "Gluster volume", ""], ["dir", "Directory in the volume", "/"]],
  zfs: [["srcname", "ZFS pool", ""], ["device", "Device (to build)", ""]],
  btrfs: [["target", "Target directory", ""], ["device", "Device (optional)", ""]],
};

function poolFormFields() {
  const type = $("#pf-type").value;
  $("#pf-fields").replaceChildren(...POOL_FIELDS[type].map(([key, label, dflt]) => {
    const id = `pf-${key}`;
    return el("div", { class: "row" }, el("label", { for: id, text: label }),
      el("input", { id, name: key, value: dflt }));
  }));
}

// libvirt's pool XML, built as a DOM so that every value is escaped.
function poolXml(name, type, f) {
  const doc = document.implementation.createDocument(null, "pool");
  const root = doc.documentElement;
  root.setAttribute("type", type);
  const add = (parent, tag, attrs = {}, text) => {
    const e = doc.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    parent.appendChild(e);
    return e;
  };
  add(root, "name", {}, name);
  const src = add(root, "source");
  if (f.host) add(src, "host", { name: f.host });
  if (f.device) add(src, "device", { path: f.device });
  if (f.dir) add(src, "dir", { path: f.dir });
  if (f.srcname) add(src, "name", {}, f.srcname);
  if (f.format) add(src, "format", { type: f.format });
  if (f.initiator) add(add(src, "initiator"), "iqn", { name: f.initiator });
  if (f.auth_user) {
    const auth = add(src, "auth", { type: "ceph", username: f.auth_user });
    if (f.auth_secret) add(auth, "secret", { uuid: f.auth_secret });
  }
  if (!src.hasChildNodes()) root.removeChild(src);
  if (f.target) add(add(root, "target"), "path", {}, f.target);
  return new XMLSerializer().serializeToString(doc);
}

async function definePool(xml, build) {
  const info = await api("POST", "/v1/pools", { xml });
  if (build) await api("POST", `${poolPath(info.name)}/start`, { json: { build: true } });
  report(`Pool ${info.name} defined${build ? " and started" : ""}`, true);
  await loadPools();
}

// -- volumes ---------------------------------------------------------------------------
let volSeq = 0;
async function loadVolumes() {
  const tbody = $("#vol-table tbody");
  if (!state.pool) { tbody.replaceChildren(); $("#vol-range").textContent = "no running pool"; return; }
  const seq = ++volSeq;
  const limit = Number($("#vq-limit").value);
  const q = new URLSearchParams({ offset: state.offset, limit, sort: state.sort, filter: $("#vq-filter").value });
  const page = await api("GET", `${poolPath(state.pool)}/volumes?${q}`);
  if (seq !== volSeq) return; // a later query has been sent meanwhile
  if (page.total && state.offset >= page.total) {
    state.offset = Math.max(0, Math.floor((page.total - 1) / limit) * limit);
    return loadVolumes();
  }
  tbody.replaceChildren(...page.volumes.map((v) => el("tr", { "data-volume": v.name },
    el("th", { scope: "row", text: v.name }), el("td", { text: v.format || "" }),
    el("td", { text: size(v.capacity), "data-bytes": v.capacity }),
    el("td", { text: size(v.allocation), "data-bytes": v.allocation }),
    el("td", {}, button("Open", () => openVolume(v.name), { write: false, name: `Open volume ${v.name}` })))));
  const first = page.total ? page.offset + 1 : 0;
  const last = page.offset + page.volumes.length;
  $("#vol-range").textContent = `${first}–${last} of ${page.total}`;
  $("#vol-count").textContent = `Volumes of pool ${state.pool}: ${page.total}${$("#vq-filter").value ? " matching" : ""}`;
  $("#vol-prev").disabled = page.offset === 0;
  $("#vol-next").disabled = last >= page.total;
}

function sortBy(key) {
  const [cur, desc] = [state.sort.replace(/^-/, ""), state.sort.startsWith("-")];
  state.sort = cur === key && !desc ? `-${key}` : key;
  for (const th of document.querySelectorAll("#vol-table th[data-sort]")) {
    th.setAttribute("aria-sort", th.dataset.sort !== key ? "none"
      : state.sort.startsWith("-") ? "descending" : "ascending");
  }
  state.offset = 0;
  return loadVolumes();
}

async function openVolume(name) {
  const pool = state.pool;
  state.selected = { pool, name };
  const [info, xml, snaps] = await Promise.all([
    api("GET", volPath(pool, name)), api("GET", `${volPath(pool, name)}/xml`),
    api("GET", `${volPath(pool, name)}/snapshots`).catch(() => [])]);
  $("#vd-title").textContent = `Volume ${name} (pool ${pool})`;
  const dl = $("#vd-info");
  dl.replaceChildren();
  for (const [k, v] of [["Path", info.path], ["Type", info.type], ["Format", info.format || ""],
    ["Capacity", size(info.capacity)], ["Allocation", size(info.allocation)]]) {
    dl.append(el("dt", { text: k }), el("dd", { text: v }));
  }
  $("#vd-xml").textContent = xml;
  await showChain(xml);
  const path = volPath(pool, name);
  $("#vd-actions").replaceChildren(
    button("Download", async () => {
      // A link cannot send the Authorization header: a one-time ticket stands in for it,
      // and the browser streams the bytes to disk itself.
      const t = await api("POST", "/v1/tickets", { json: { path: `${path}/download` } });
      const a = el("a", { href: t.url, download: name, hidden: true });
      document.body.append(a);
      a.click();
      a.remove();
    }, { name: `Download volume ${name}` }),
    button("Wipe", async () => {
      if (!confirm(`Overwrite all of ${name} with zeros?`)) return;
      await api("POST", `${path}/wipe`, { json: { algorithm: "zero" } });
      showTab("jobs");
    }, { name: `Wipe volume ${name}` }),
    button("Delete", async () => {
      if (!confirm(`Delete volume ${name}?`)) return;
      await api("DELETE", path);
      $("#vol-detail").hidden = true; state.selected = null;
      report(`Volume ${name} deleted`, true); await loadVolumes();
    }, { name: `Delete volume ${name}` }));
  $("#snap-table tbody").replaceChildren(...snaps.map((s) => el("tr", {},
    el("th", { scope: "row", text: s.name }), el("td", { text: s.kind }),
    el("td", { text: new Date(s.created * 1000).toLocaleString() }),
    el("td", { class: "actions" },
      button("Revert", async () => {
        if (!confirm(`Revert ${name} to snapshot ${s.name}?`)) return;
        await api("POST", `${path}/snapshots/${enc(s.name)}/revert`); await openVolume(name);
      }, { name: `Revert to snapshot ${s.name}` }),
      button("Delete", async () => {
        await api("DELETE", `${path}/snapshots/${enc(s.name)}`); await openVolume(name);
      }, { name: `Delete snapshot ${s.name}` })))));
  $("#vol-detail").hidden = false;
}

// The backing chain from each image's XML: <backingStore><path>; the next one is looked up
// by its path (it may be in another pool, or in none).
async function showChain(xml) {
  const ol = $("#vd-chain");
  ol.replaceChildren();
  for (let depth = 0; depth < 16; depth++) {
    const doc = new DOMParser().parseFromString(xml, "application/xml");
    const path = doc.querySelector("volume > backingStore > path");
    if (!path) break;
    const fmt = doc.querySelector("volume > backingStore > format");
    ol.append(el("li", { text: `${path.textContent}${fmt ? ` (${fmt.getAttribute("type")})` : ""}` }));
    try {
      const next = await api("GET", `/v1/volumes?path=${enc(path.textContent)}`);
      xml = await api("GET", `${volPath(next.pool, next.name)}/xml`);
    } catch { break; }
  }
  if (!ol.children.length) ol.append(el("li", { text: "none: the volume has no backing file" }));
}

async function uploadFile(file, name) {
  const pool = state.pool;
  try {
    await api("GET", volPath(pool, name));
  } catch (e) {
    if (e.status !== 404) throw e;
    await api("POST", `${poolPath(pool)}/volumes`, { json: { name, capacity: file.size, format: "raw" } });
  }
  report(`Uploading ${file.name} into ${name}…`);
  // The browser streams the File from disk; the job's progress shows under Jobs.
  await api("PUT", `${volPath(pool, name)}/upload`, { body: file, type: "application/octet-stream" });
  report(`Uploaded ${size(file.size)} into ${name}`, true);
  await loadVolumes();
}

// -- jobs ------------------------------------------------------------------------------
async function loadJobs() {
  for (const j of await api("GET", "/v1/jobs")) showJob(j);
}

function showJob(j) {
  const old = state.jobs.get(j.id);
  const done = j.bytes_done || 0, total = j.bytes_total || 0;
  const pct = total ? Math.floor(100 * done / total) : (j.state === "done" ? 100 : 0);
  const left = j.rate > 0 && total ? (total - done) / j.rate : NaN;
  const vol = [j.pool, j.volume].filter(Boolean).join("/") +
    (j.target_volume ? ` → ${[j.target_pool, j.target_volume].filter(Boolean).join("/")}` : "");
  const running = j.state === "running" || j.state === "queued";
  const tr = el("tr", { "data-job": j.id, "data-state": j.state },
    el("th", { scope: "row", text: j.kind }), el("td", { text: vol }),
    el("td", { text: j.error ? `${j.state}: ${j.error}` : j.state }),
    el("td", {}, bar(pct, 100, `Progress of ${j.kind} ${vol}`), el("span", { class: "pct", text: ` ${pct}% (${size(done)} of ${size(total)})` })),
    el("td", { text: running && j.rate ? `${size(j.rate)}/s` : "" }),
    el("td", { text: running ? duration(left) : "" }),
    el("td", {}, running ? button("Cancel", () => api("DELETE", `/v1/jobs/${enc(j.id)}`),
      { name: `Cancel ${j.kind} of ${vol}` }) : ""));
  if (old) old.replaceWith(tr);
  else $("#jobs-table tbody").prepend(tr);
  state.jobs.set(j.id, tr);
}

// The event stream (Server-Sent Events) read with fetch, since EventSource cannot send
// the Authorization header; it resumes from the last event after a break.
async function followEvents() {
  const ctl = new AbortController();
  state.stream = ctl;
  if (state.lastEvent === null) state.lastEvent = (await api("GET", "/v1/events/latest")).id;
  while (state.token && !ctl.signal.aborted) {
    try {
      const resp = await fetch(`/v1/events?since=${state.lastEvent}`, {
        headers: { Authorization: `Bearer ${state.token}`, Accept: "text/event-stream" },
        signal: ctl.signal, cache: "no-store" });
      if (!resp.ok) throw new Error(`events: ${resp.status}`);
      const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += value;
        let cut;
        while ((cut = buf.indexOf("\n\n")) >= 0) {
          const block = buf.slice(0, cut); buf = buf.slice(cut + 2);
          const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5)).join("\n");
          if (data) onEvent(JSON.parse(data));
        }
      }
    } catch (e) {
      if (ctl.signal.aborted) return;
    }
    await new Promise((r) => setTimeout(r, 1000));
  }
}

let reloadTimer = null;
function onEvent(ev) {
  state.lastEvent = ev.id;
  if (ev.job) showJob(ev.job);
  if (ev.kind === "pool" || ev.kind === "volume" || (ev.job && ev.job.state !== "running")) {
    // Many events come in bursts (a refresh, a batch of creates): reload once after them.
    clearTimeout(reloadTimer);
    reloadTimer = setTimeout(() => { loadPools().then(loadVolumes).catch(report); }, 300);
  }
}

// -- host and secrets ------------------------------------------------------------------
async function loadHost() {
  const devs = await api("GET", "/v1/host/devices");
  const keys = [...new Set(devs.flatMap((d) => Object.keys(d)))].filter((k) => typeof devs[0]?.[k] !== "object").slice(0, 8);
  $("#dev-table thead").replaceChildren(el("tr", {}, ...keys.map((k) => el("th", { scope: "col", text: k }))));
  $("#dev-table tbody").replaceChildren(...devs.map((d) => el("tr", {}, ...keys.map((k) => {
    const v = d[k];
    return el("td", { text: typeof v === "number" && /size|capacity/.test(k) ? size(v) : v === null || v === undefined ? "" : String(v) });
  }))));
}

async function loadSecrets() {
  const list = await api("GET", "/v1/secrets");
  $("#secrets-table tbody").replaceChildren(...list.map((s) => el("tr", {},
    el("th", { scope: "row", text: s.uuid }), el("td", { text: s.usage_type || "" }),
    el("td", { text: s.usage_id || "" }), el("td", { text: s.description || "" }),
    el("td", { text: s.ephemeral ? "yes" : "no" }), el("td", { text: s.private ? "yes" : "no" }))));
}

// -- wiring ----------------------------------------------------------------------------
function onSubmit(sel, fn) {
  $(sel).addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const form = ev.target;
    const btn = form.querySelector("button[type=submit]");
    btn.disabled = true;
    try { await fn(new FormData(form), form); } catch (e) { report(e); } finally {
      btn.disabled = btn.hasAttribute("data-write") && state.role !== "rw";
    }
  });
}

function init() {
  for (const t of Object.keys(POOL_FIELDS)) {
    $("#pf-type").append(el("option", { text: t }));
    $("#sr-type").append(el("option", { text: t }));
  }
  poolFormFields();
  $("#pf-type").addEventListener("change", poolFormFields);
  for (const b of document.querySelectorAll("nav button")) b.addEventListener("click", () => showTab(b.dataset.tab));
  $("#logout").addEventListener("click", () => logout());

  onSubmit("#login-form", async (fd) => { await login(fd.get("token").trim()); $("#token").value = ""; });
  onSubmit("#pool-form", async (fd) => {
    const type = fd.get("type");
    const f = Object.fromEntries(POOL_FIELDS[type].map(([k]) => [k, (fd.get(k) || "").trim()]));
    await definePool(poolXml(fd.get("name").trim(), type, f), fd.get("build") === "on");
  });
  onSubmit("#pool-xml-form", (fd) => definePool(fd.get("xml"), false));
  onSubmit("#vol-form", async (fd, form) => {
    const json = { name: fd.get("name").trim(), capacity: parseSize(fd.get("capacity")) };
    if (fd.get("format")) json.format = fd.get("format");
    if (fd.get("backing").trim()) json.backing_vol = fd.get("backing").trim();
    const v = await api("POST", `${poolPath(state.pool)}/volumes`, { json });
    report(`Volume ${v.name} created: ${v.path}`, true);
    form.reset();
    await loadVolumes();
  });
  onSubmit("#upload-form", async (fd, form) => {
    const file = fd.get("file");
    await uploadFile(file, (fd.get("name") || "").trim() || file.name);
    form.reset();
  });
  onSubmit("#clone-form", async (fd) => {
    const { pool, name } = state.selected;
    const json = { new_name: fd.get("new_name").trim(), linked: fd.get("linked") === "on" };
    if (fd.get("bandwidth").trim()) json.bandwidth = parseSize(fd.get("bandwidth"));
    if (json.linked) json.format = "qcow2";
    const job = await api("POST", `${volPath(pool, name)}/clone`, { json });
    showJob(job);
    report(`Cloning ${name} into ${json.new_name}: see Jobs`, true);
    showTab("jobs");
  });
  onSubmit("#resize-form", async (fd) => {
    const { pool, name } = state.selected;
    await api("POST", `${volPath(pool, name)}/resize`, { json: { capacity: parseSize(fd.get("capacity")), shrink: fd.get("shrink") === "on" } });
    report(`Resizing ${name}`, true);
  });
  onSubmit("#snap-form", async (fd, form) => {
    const { pool, name } = state.selected;
    await api("POST", `${volPath(pool, name)}/snapshots`, { json: { name: fd.get("name").trim() } });
    form.reset();
    await openVolume(name);
  });
  onSubmit("#sources-form", async (fd) => {
    const q = new URLSearchParams({ type: fd.get("type") });
    if (fd.get("host").trim()) q.set("source", `<source><host name="${fd.get("host").trim().replace(/[<>&"']/g, "")}"/></source>`);
    $("#sources").textContent = await api("GET", `/v1/pool-sources?${q}`);
  });

  $("#vq-pool").addEventListener("change", () => { state.pool = $("#vq-pool").value; state.offset = 0; loadVolumes().catch(report); });
  $("#vq-limit").addEventListener("change", () => { state.offset = 0; loadVolumes().catch(report); });
  let t = null;
  $("#vq-filter").addEventListener("input", () => {
    clearTimeout(t);
    t = setTimeout(() => { state.offset = 0; loadVolumes().catch(report); }, 250);
  });
  $("#vol-query").addEventListener("submit", (ev) => ev.preventDefault());
  for (const th of document.querySelectorAll("#vol-table th[data-sort]")) {
    th.querySelector("button").addEventListener("click", () => sortBy(th.dataset.sort).catch(report));
  }
  $("#vol-prev").addEventListener("click", () => {
    state.offset = Math.max(0, state.offset - Number($("#vq-limit").value)); loadVolumes().catch(report);
  });
  $("#vol-next").addEventListener("click", () => {
    state.offset += Number($("#vq-limit").value); loadVolumes().catch(report);
  });

  // A token in the address's fragment (never sent to the server) logs in at once.
  const m = /(?:^#|&)token=([^&]+)/.exec(location.hash);
  if (m) history.replaceState(null, "", location.pathname);
  const token = m ? decodeURIComponent(m[1]) : sessionStorage.getItem("virtstore-token");
  if (token) login(token).catch(report);
  else $("#token").focus();
}

init();
