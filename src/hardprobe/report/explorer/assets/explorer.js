// hardprobe explorer: every example of a run's split(s), offline, in one page.
// Reads the JSON in #hp-data (written by hardprobe.report.explorer); no request leaves the file.
"use strict";
(function () {
  const D = JSON.parse(document.getElementById("hp-data").textContent);
  const N = D.n, CLS = D.classes, C = CLS.length;
  const $ = (id) => document.getElementById(id);
  const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;",
    ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));

  // ------------------------------------------------------------ columns
  function bytes(b64) {
    const bin = atob(b64), u = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) u[i] = bin.charCodeAt(i);
    return u;
  }
  const COL = {};
  for (const [name, spec] of Object.entries(D.columns)) {
    const c = {t: spec.t};
    if (spec.t === "f32") c.a = new Float32Array(bytes(spec.b64).buffer);
    else if (spec.t === "i32") c.a = new Int32Array(bytes(spec.b64).buffer);
    else if (spec.t === "bool") c.a = bytes(spec.b64);          // 0, 1, 255 = missing
    else if (spec.t === "cat") { c.a = new Int32Array(bytes(spec.b64).buffer); c.values = spec.values; }
    else c.v = spec.v;                                            // "str": list of str / null
    COL[name] = c;
  }
  const has = (name) => name in COL;
  // a column's value of row i, for display (null when missing)
  function value(name, i) {
    const c = COL[name];
    if (c.t === "bool") return c.a[i] === 255 ? null : c.a[i] === 1;
    if (c.t === "cat") return c.a[i] < 0 ? null : c.values[c.a[i]];
    if (c.t === "str") return c.v[i];
    const v = c.a[i];
    return Number.isNaN(v) ? null : v;
  }
  const numCache = {};
  function numeric(name) {  // Float64Array, NaN where missing
    if (numCache[name]) return numCache[name];
    const c = COL[name], out = new Float64Array(N);
    for (let i = 0; i < N; i++) {
      out[i] = c.t === "bool" ? (c.a[i] === 255 ? NaN : c.a[i]) : c.a[i];
    }
    return (numCache[name] = out);
  }
  const keyCache = {};
  function keyed(name) {  // any column as {codes: Int32Array (-1 missing), values: [str]}
    if (keyCache[name]) return keyCache[name];
    const c = COL[name];
    if (c.t === "cat") return (keyCache[name] = {codes: c.a, values: c.values});
    const codes = new Int32Array(N), values = [], index = new Map();
    for (let i = 0; i < N; i++) {
      const v = value(name, i);
      if (v === null || v === "") { codes[i] = -1; continue; }
      const k = String(v);
      if (!index.has(k)) { index.set(k, values.length); values.push(k); }
      codes[i] = index.get(k);
    }
    return (keyCache[name] = {codes, values});
  }
  function present(name) {  // Uint8Array: 1 where the column holds a real (non-false) value
    const out = new Uint8Array(N), c = COL[name];
    if (c.t === "bool") { for (let i = 0; i < N; i++) out[i] = c.a[i] === 1 ? 1 : 0; return out; }
    const k = keyed(name);
    const no = new Set(["false", "False", "0", "-1", "nan", "None"]);
    const bad = k.values.map((v) => no.has(v));
    for (let i = 0; i < N; i++) out[i] = k.codes[i] >= 0 && !bad[k.codes[i]] ? 1 : 0;
    return out;
  }

  const HEAD = D.primary;
  const G = COL.label.a, P = COL["pred_" + HEAD].a;
  const CORRECT = new Uint8Array(N);
  for (let i = 0; i < N; i++) CORRECT[i] = G[i] === P[i] ? 1 : 0;
  const idOf = (i) => String(value("id", i));
  const ROW_OF = new Map();
  for (let i = 0; i < N; i++) ROW_OF.set(idOf(i), i);
  const HAS_MAP = has("_map_x") && has("_map_y");
  const MX = HAS_MAP ? COL._map_x.a : null, MY = HAS_MAP ? COL._map_y.a : null;
  const NOT_SCORES = /^(label|clean_label|pred_|ft_pred|_map_|planted_noise)/;
  const SCORES = Object.keys(COL).filter((c) => (COL[c].t === "f32" || COL[c].t === "i32") &&
    !NOT_SCORES.test(c));
  let lowerText = null;
  function searchText() {
    if (lowerText) return lowerText;
    lowerText = new Array(N);
    for (let i = 0; i < N; i++) {
      lowerText[i] = (idOf(i) + " " + (has("path") ? value("path", i) || "" : "")).toLowerCase();
    }
    return lowerText;
  }

  // ------------------------------------------------------------ sprites
  const SP = D.sprite;
  const sheetImgs = SP.sheets.map((url) => { const im = new Image(); im.src = url; return im; });
  const nTiles = N + (function () {
    let m = -1;
    for (const v of Object.values(D.neighbors)) for (const nb of v) m = Math.max(m, nb[0]);
    return Math.max(0, m + 1 - N);
  })();
  (function sheetStyles() {
    const st = document.createElement("style");
    st.textContent = SP.sheets.map((u, s) => `.s${s}{background-image:url("${u}")}`).join("\n");
    document.head.appendChild(st);
  })();
  function sheetRows(s) {
    const inSheet = Math.min(SP.per_sheet, nTiles - s * SP.per_sheet);
    return Math.max(1, Math.ceil(inSheet / SP.cols));
  }
  function place(t) {
    const s = Math.floor(t / SP.per_sheet), k = t % SP.per_sheet;
    return {s, x: (k % SP.cols) * SP.size, y: Math.floor(k / SP.cols) * SP.size};
  }
  function setThumb(el, t, px) {  // el shows tile t at px x px via its sheet's CSS class
    const p = place(t), f = px / SP.size;
    el.className = "th s" + p.s;
    el.style.backgroundSize = `${SP.cols * SP.size * f}px ${sheetRows(p.s) * SP.size * f}px`;
    el.style.backgroundPosition = `${-p.x * f}px ${-p.y * f}px`;
  }
  function drawTile(ctx, t, x, y, w, h) {
    const p = place(t), im = sheetImgs[p.s];
    if (im.complete && im.naturalWidth) ctx.drawImage(im, p.x, p.y, SP.size, SP.size, x, y, w, h);
    else im.addEventListener("load", () => drawTile(ctx, t, x, y, w, h), {once: true});
  }

  // ------------------------------------------------------------ state <-> URL fragment
  const DEFAULT = {split: "", given: "", pred: "", correct: "", cause: "", slice: "", issue: "",
    dup: "", tdup: "", sc: "", lo: "", hi: "", q: "", pair: "", box: "",
    sort: has("hardness") ? "hardness" : (SCORES[0] || ""), desc: "1", open: "", color: "class"};
  let S = Object.assign({}, DEFAULT);
  function readHash() {
    const out = Object.assign({}, DEFAULT);
    const h = new URLSearchParams(location.hash.replace(/^#/, ""));
    for (const k of Object.keys(DEFAULT)) if (h.has(k)) out[k] = h.get(k);
    return out;
  }
  function writeHash() {
    const h = new URLSearchParams();
    for (const k of Object.keys(DEFAULT)) if (S[k] !== DEFAULT[k]) h.set(k, S[k]);
    const s = h.toString();
    history.replaceState(null, "", s ? "#" + s : location.pathname + location.search);
  }

  // ------------------------------------------------------------ filtering
  const orderCache = {};
  function order(col, desc) {  // row indices sorted by col (NaN last), ties by row
    const key = col + "|" + desc;
    if (orderCache[key]) return orderCache[key];
    const idx = new Int32Array(N);
    for (let i = 0; i < N; i++) idx[i] = i;
    if (col && has(col)) {
      const v = numeric(col), sgn = desc === "1" ? -1 : 1;
      idx.sort((a, b) => {
        const x = v[a], y = v[b], nx = Number.isNaN(x), ny = Number.isNaN(y);
        if (nx || ny) return nx === ny ? a - b : (nx ? 1 : -1);
        return x === y ? a - b : sgn * (x - y);
      });
    }
    return (orderCache[key] = idx);
  }
  function predicates(st) {  // [(i) => bool] of every filter but the confusion pair
    const ps = [];
    const code = (name, want) => { const k = keyed(name), c = k.values.indexOf(want);
      const cs = k.codes; ps.push((i) => cs[i] === c); };
    if (st.split && has("split")) code("split", st.split);
    if (st.given !== "") { const g = +st.given; ps.push((i) => G[i] === g); }
    if (st.pred !== "") { const p = +st.pred; ps.push((i) => P[i] === p); }
    if (st.correct === "1") ps.push((i) => CORRECT[i] === 1);
    if (st.correct === "0") ps.push((i) => CORRECT[i] === 0);
    if (st.cause && has("failure_mode")) code("failure_mode", st.cause);
    if (st.slice && has("slice_id")) code("slice_id", st.slice);
    if (st.issue === "1" && has("label_issue")) { const a = present("label_issue"); ps.push((i) => a[i] === 1); }
    if (st.dup === "1" && has("duplicate_group")) { const a = present("duplicate_group"); ps.push((i) => a[i] === 1); }
    if (st.tdup === "1" && has("train_duplicate")) { const a = present("train_duplicate"); ps.push((i) => a[i] === 1); }
    if (st.sc && has(st.sc) && (st.lo !== "" || st.hi !== "")) {
      const v = numeric(st.sc), lo = st.lo === "" ? -Infinity : +st.lo, hi = st.hi === "" ? Infinity : +st.hi;
      ps.push((i) => v[i] >= lo && v[i] <= hi);
    }
    if (st.q) { const q = st.q.toLowerCase(), t = searchText(); ps.push((i) => t[i].includes(q)); }
    if (st.box && HAS_MAP) {
      const [x0, y0, x1, y1] = st.box.split(",").map(Number);
      ps.push((i) => MX[i] >= x0 && MX[i] <= x1 && MY[i] >= y0 && MY[i] <= y1);
    }
    return ps;
  }
  let RESULT = new Int32Array(0), MATCH = new Uint8Array(N), CM = new Int32Array(C * C);
  function applyFilter(st) {  // one pass: the confusion counts and the matching rows in order
    const ps = predicates(st), np = ps.length, ord = order(st.sort, st.desc);
    const pair = st.pair ? st.pair.split(",").map(Number) : null;
    const res = new Int32Array(N), match = new Uint8Array(N), cm = new Int32Array(C * C);
    let n = 0;
    outer: for (let k = 0; k < N; k++) {
      const i = ord[k];
      for (let j = 0; j < np; j++) if (!ps[j](i)) continue outer;
      if (G[i] >= 0 && G[i] < C && P[i] >= 0 && P[i] < C) cm[G[i] * C + P[i]]++;
      if (pair && (G[i] !== pair[0] || P[i] !== pair[1])) continue;
      res[n++] = i; match[i] = 1;
    }
    RESULT = res.subarray(0, n); MATCH = match; CM = cm;
    return n;
  }

  // ------------------------------------------------------------ controls
  function options(sel, pairs, cur) {
    sel.innerHTML = pairs.map(([v, t]) => `<option value="${esc(v)}"${String(v) === cur ? " selected" : ""}>${esc(t)}</option>`).join("");
  }
  function buildFilters() {
    const f = $("filters"), any = [["", "any"]];
    const classOpts = any.concat(CLS.map((c, k) => [String(k), c]));
    let h = "";
    const sel = (id, label) => { h += `<label for="${id}">${label}</label><select id="${id}"></select>`; };
    const chk = (id, label) => { h += `<label class="check"><input type="checkbox" id="${id}"> ${label}</label>`; };
    if (has("split") && keyed("split").values.length > 1) sel("f-split", "split");
    sel("f-given", "given class"); sel("f-pred", `predicted class (${esc(HEAD)})`);
    sel("f-correct", "correct / wrong");
    if (has("failure_mode")) sel("f-cause", "cause (failure_mode)");
    if (has("slice_id")) sel("f-slice", "slice (slice_id)");
    if (has("label_issue")) chk("f-issue", "label-issue candidates");
    if (has("duplicate_group")) chk("f-dup", "in a duplicate group");
    if (has("train_duplicate")) chk("f-tdup", "duplicate of a train image");
    h += `<label for="f-sc">score range</label><select id="f-sc"></select>
      <div class="row"><input id="f-lo" type="number" step="any" placeholder="min">
      <input id="f-hi" type="number" step="any" placeholder="max"></div>
      <label for="f-q">search id / path</label><input id="f-q" type="text" placeholder="text">
      <label for="f-sort">sort by</label><select id="f-sort"></select>
      <label class="check"><input type="checkbox" id="f-desc"> highest first</label>
      <button id="f-reset">reset all filters</button>`;
    f.innerHTML = h;
    const scoreOpts = SCORES.map((c) => [c, c]);
    const wire = (id, key, opts, kind) => {
      const el = $(id);
      if (!el) return;
      if (opts) options(el, opts, S[key]);
      const ev = kind === "text" ? "input" : "change";
      el.addEventListener(ev, () => set({[key]: el.type === "checkbox" ? (el.checked ? "1" : "") : el.value}));
    };
    wire("f-split", "split", any.concat(has("split") ? keyed("split").values.map((v) => [v, v]) : []));
    wire("f-given", "given", classOpts); wire("f-pred", "pred", classOpts);
    wire("f-correct", "correct", [["", "all"], ["1", "correct"], ["0", "wrong"]]);
    if (has("failure_mode")) wire("f-cause", "cause", any.concat(keyed("failure_mode").values.map((v) => [v, v])));
    if (has("slice_id")) wire("f-slice", "slice", any.concat(keyed("slice_id").values.map((v) => [v, v])));
    wire("f-issue", "issue"); wire("f-dup", "dup"); wire("f-tdup", "tdup");
    wire("f-sc", "sc", [["", "(none)"]].concat(scoreOpts));
    wire("f-lo", "lo", null, "text"); wire("f-hi", "hi", null, "text"); wire("f-q", "q", null, "text");
    wire("f-sort", "sort", [["", "table order"]].concat(scoreOpts));
    const desc = $("f-desc");
    desc.addEventListener("change", () => set({desc: desc.checked ? "1" : "0"}));
    $("f-reset").addEventListener("click", () => set(Object.assign({}, DEFAULT, {open: "", color: S.color})));
  }
  function syncControls() {  // the controls show S (after a reset or a hash restore)
    const v = {"f-split": "split", "f-given": "given", "f-pred": "pred", "f-correct": "correct",
      "f-cause": "cause", "f-slice": "slice", "f-sc": "sc", "f-lo": "lo", "f-hi": "hi", "f-q": "q",
      "f-sort": "sort"};
    for (const [id, k] of Object.entries(v)) { const el = $(id); if (el && el.value !== S[k]) el.value = S[k]; }
    for (const [id, k] of [["f-issue", "issue"], ["f-dup", "dup"], ["f-tdup", "tdup"]]) {
      const el = $(id); if (el) el.checked = S[k] === "1";
    }
    $("f-desc").checked = S.desc === "1";
    if ($("map-color")) $("map-color").value = S.color;
  }
  function chips() {
    const c = [];
    const name = (k) => CLS[+k] === undefined ? k : CLS[+k];
    if (S.pair) { const [g, p] = S.pair.split(","); c.push(["pair", `given ${name(g)} → predicted ${name(p)}`]); }
    if (S.box) c.push(["box", "map box"]);
    if (S.given !== "") c.push(["given", "given " + name(S.given)]);
    if (S.pred !== "") c.push(["pred", "predicted " + name(S.pred)]);
    if (S.correct) c.push(["correct", S.correct === "1" ? "correct" : "wrong"]);
    for (const k of ["split", "cause", "slice", "q"]) if (S[k]) c.push([k, k + ": " + S[k]]);
    if (S.issue) c.push(["issue", "label issue"]);
    if (S.dup) c.push(["dup", "duplicate group"]);
    if (S.tdup) c.push(["tdup", "train duplicate"]);
    if (S.sc && (S.lo !== "" || S.hi !== "")) c.push(["sc", `${S.lo || "−∞"} ≤ ${S.sc} ≤ ${S.hi || "∞"}`]);
    $("chips").innerHTML = c.length ? c.map(([k, t]) => `<span class="chip" data-k="${k}" title="remove">${esc(t)} ✕</span>`).join("")
      : '<span class="muted">no filter: every example of ' + esc(D.splits.join(" + ")) + "</span>";
  }
  $("chips").addEventListener("click", (e) => {
    const k = e.target.dataset && e.target.dataset.k;
    if (!k) return;
    set(k === "sc" ? {sc: "", lo: "", hi: ""} : {[k]: ""});
  });

  // ------------------------------------------------------------ grid (virtualised)
  const CW = 116, CH = 132, grid = $("grid"), spacer = $("grid-spacer"), pool = [];
  let gridCols = 1;
  function cellFor(k) {
    if (!pool[k]) {
      const el = document.createElement("div");
      el.className = "cell";
      el.innerHTML = '<div class="th"></div><div class="lb"></div><div class="meta"></div>';
      spacer.appendChild(el);
      pool[k] = el;
    }
    return pool[k];
  }
  function renderGrid() {
    gridCols = Math.max(1, Math.floor(grid.clientWidth / CW));
    spacer.style.height = Math.ceil(RESULT.length / gridCols) * CH + "px";
    const r0 = Math.max(0, Math.floor(grid.scrollTop / CH) - 2);
    // at most ~60 rows of cells exist, whatever the layout says: the grid stays virtual
    const r1 = Math.min(r0 + 60, Math.ceil((grid.scrollTop + grid.clientHeight) / CH) + 2);
    const first = r0 * gridCols, last = Math.min(RESULT.length, r1 * gridCols);
    const hard = has("hardness") ? COL.hardness.a : null, openRow = rowOpen();
    let k = 0;
    for (let pos = first; pos < last; pos++, k++) {
      const i = RESULT[pos], el = cellFor(k);
      el.hidden = false;
      el.dataset.row = i; el.dataset.pos = pos;
      el.style.left = (pos % gridCols) * CW + "px";
      el.style.top = Math.floor(pos / gridCols) * CH + "px";
      el.classList.toggle("open", i === openRow);
      setThumb(el.firstChild, i, 64);
      const lb = el.childNodes[1], ok = CORRECT[i] === 1;
      lb.className = "lb" + (ok ? "" : " wrong");
      lb.innerHTML = `${esc(CLS[G[i]])} → <span class="p">${esc(CLS[P[i]])}</span>`;
      lb.title = `given ${CLS[G[i]]}, predicted ${CLS[P[i]]} (${HEAD})`;
      const cause = has("failure_mode") ? value("failure_mode", i) : null;
      el.childNodes[2].textContent = (hard ? "h " + hard[i].toFixed(3) : "") + (cause ? " · " + cause : "");
      el.title = idOf(i);
    }
    for (; k < pool.length; k++) pool[k].hidden = true;
  }
  let gridQueued = false;
  grid.addEventListener("scroll", () => {
    if (gridQueued) return;
    gridQueued = true;
    requestAnimationFrame(() => { gridQueued = false; renderGrid(); });
  });
  window.addEventListener("resize", () => { renderGrid(); });
  spacer.addEventListener("click", (e) => {
    const cell = e.target.closest(".cell");
    if (cell) set({open: idOf(+cell.dataset.row)});
  });

  // ------------------------------------------------------------ confusion matrix
  function renderCM() {
    $("cm-head").textContent = `(${HEAD} head)`;
    let rowSum = new Int32Array(C);
    for (let g = 0; g < C; g++) for (let p = 0; p < C; p++) rowSum[g] += CM[g * C + p];
    const short = (s) => s.length > 5 ? s.slice(0, 5) + "…" : s;
    let h = "<table><tr><th></th>" + CLS.map((c) => `<th title="predicted ${esc(c)}">${esc(short(c))}</th>`).join("") + "</tr>";
    for (let g = 0; g < C; g++) {
      h += `<tr><th title="given ${esc(CLS[g])}">${esc(short(CLS[g]))}</th>`;
      for (let p = 0; p < C; p++) {
        const n = CM[g * C + p], share = rowSum[g] ? n / rowSum[g] : 0;
        const bg = g === p ? `rgba(46,125,50,${share.toFixed(3)})` : `rgba(198,40,40,${Math.min(1, 3 * share).toFixed(3)})`;
        const sel = S.pair === `${g},${p}` ? " sel" : "";
        h += `<td class="${sel}" data-g="${g}" data-p="${p}" style="background:${bg}" title="given ${esc(CLS[g])}, predicted ${esc(CLS[p])}: ${n}">${C <= 20 && n ? n : ""}</td>`;
      }
      h += "</tr>";
    }
    $("cm").innerHTML = h + "</table>";
  }
  $("cm").addEventListener("click", (e) => {
    const td = e.target.closest("td");
    if (!td) return;
    const pair = `${td.dataset.g},${td.dataset.p}`;
    set({pair: S.pair === pair ? "" : pair});
  });

  // ------------------------------------------------------------ map
  const TAB10 = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
    "#7f7f7f", "#bcbd22", "#17becf"];
  const palette = (k) => k < 10 ? TAB10[k] : `hsl(${(k * 137.508) % 360},65%,45%)`;
  const canvas = $("map"), mctx = canvas.getContext("2d"), MW = 360, PAD = 8;
  const PX = new Float32Array(N), PY = new Float32Array(N);
  let mapRows = new Int32Array(0), bounds = null, drag = null;
  function setupMap() {
    if (!HAS_MAP) { $("map-section").hidden = true; return; }
    const dpr = window.devicePixelRatio || 1;
    canvas.width = MW * dpr; canvas.height = MW * dpr;
    mctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    let x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
    const rows = [];
    for (let i = 0; i < N; i++) {
      const x = MX[i], y = MY[i];
      if (!Number.isFinite(x) || !Number.isFinite(y)) continue;
      rows.push(i);
      if (x < x0) x0 = x; if (x > x1) x1 = x; if (y < y0) y0 = y; if (y > y1) y1 = y;
    }
    mapRows = Int32Array.from(rows);
    if (!rows.length) { $("map-section").hidden = true; return; }
    bounds = {x0, y0, sx: (MW - 2 * PAD) / ((x1 - x0) || 1), sy: (MW - 2 * PAD) / ((y1 - y0) || 1)};
    for (const i of mapRows) { PX[i] = PAD + (MX[i] - x0) * bounds.sx; PY[i] = MW - PAD - (MY[i] - y0) * bounds.sy; }
    const opts = [["class", "colour: given class"], ["pred", "colour: predicted class"]];
    if (has("hardness")) opts.push(["hardness", "colour: hardness"]);
    if (has("failure_mode")) opts.push(["cause", "colour: cause"]);
    options($("map-color"), opts, S.color);
    $("map-color").addEventListener("change", () => set({color: $("map-color").value}));
    if (rows.length < N) $("map-caption").textContent += ` ${N - rows.length} of ${N} examples are not on the map.`;
  }
  const toData = (px, py) => [bounds.x0 + (px - PAD) / bounds.sx, bounds.y0 + (MW - PAD - py) / bounds.sy];
  function colourOf() {  // -> [index per row, colours]
    if (S.color === "hardness" && has("hardness")) {
      const h = COL.hardness.a, K = 12, cols = [];
      for (let k = 0; k < K; k++) { const t = k / (K - 1); cols.push(`hsl(${240 - 240 * t},75%,${45 + 5 * Math.sin(Math.PI * t)}%)`); }
      return [(i) => Math.max(0, Math.min(K - 1, Math.round(h[i] * (K - 1)))), cols];
    }
    if (S.color === "cause" && has("failure_mode")) {
      const k = keyed("failure_mode");
      return [(i) => k.codes[i] + 1, ["#bbb"].concat(k.values.map((_, j) => palette(j)))];
    }
    const L = S.color === "pred" ? P : G;
    return [(i) => L[i], CLS.map((_, k) => palette(k))];
  }
  function renderLegend(cols) {
    const el = $("map-legend");
    if (S.color === "hardness") { el.innerHTML = `hardness: <span style="color:${cols[0]}">■ 0 (easy)</span> → <span style="color:${cols[cols.length - 1]}">■ 1 (hard)</span>`; return; }
    const names = S.color === "cause" ? ["(none)"].concat(keyed("failure_mode").values) : CLS;
    el.innerHTML = (S.color === "pred" ? "predicted: " : S.color === "cause" ? "cause: " : "given: ") +
      names.slice(0, 40).map((n, k) => `<span style="color:${cols[k]}">■</span> ${esc(n)}`).join(" ");
  }
  function renderMap() {
    if (!bounds) return;
    mctx.clearRect(0, 0, MW, MW);
    mctx.fillStyle = "rgba(0,0,0,0.10)";
    for (const i of mapRows) if (!MATCH[i]) mctx.fillRect(PX[i] - 1, PY[i] - 1, 2, 2);
    const [idx, cols] = colourOf(), buckets = cols.map(() => []);
    renderLegend(cols);
    for (const i of mapRows) if (MATCH[i]) { const b = buckets[idx(i)]; if (b) b.push(i); }
    buckets.forEach((b, k) => { mctx.fillStyle = cols[k]; for (const i of b) mctx.fillRect(PX[i] - 1.5, PY[i] - 1.5, 3, 3); });
    const o = rowOpen();
    if (o >= 0 && Number.isFinite(MX[o])) {
      mctx.strokeStyle = "#000"; mctx.lineWidth = 2;
      mctx.beginPath(); mctx.arc(PX[o], PY[o], 6, 0, 2 * Math.PI); mctx.stroke();
    }
    const b = drag && drag.moved ? drag : (S.box ? boxPx() : null);
    if (b) { mctx.strokeStyle = "#1565c0"; mctx.lineWidth = 1; mctx.setLineDash([4, 3]);
      mctx.strokeRect(Math.min(b.ax, b.bx), Math.min(b.ay, b.by), Math.abs(b.bx - b.ax), Math.abs(b.by - b.ay));
      mctx.setLineDash([]); }
  }
  function boxPx() {
    const [x0, y0, x1, y1] = S.box.split(",").map(Number);
    return {ax: PAD + (x0 - bounds.x0) * bounds.sx, bx: PAD + (x1 - bounds.x0) * bounds.sx,
      ay: MW - PAD - (y0 - bounds.y0) * bounds.sy, by: MW - PAD - (y1 - bounds.y0) * bounds.sy};
  }
  function nearest(px, py, r) {  // the map row nearest (px, py) within r px; matching rows first
    let best = -1, bd = r * r, bm = 0;
    for (const i of mapRows) {
      const dx = PX[i] - px, dy = PY[i] - py, d = dx * dx + dy * dy;
      if (d > r * r) continue;
      if (MATCH[i] > bm || (MATCH[i] === bm && d < bd)) { best = i; bd = d; bm = MATCH[i]; }
    }
    return best;
  }
  const mpos = (e) => { const r = canvas.getBoundingClientRect(); return [e.clientX - r.left, e.clientY - r.top]; };
  canvas.addEventListener("mousedown", (e) => { const [x, y] = mpos(e); drag = {ax: x, ay: y, bx: x, by: y, moved: false}; });
  canvas.addEventListener("mousemove", (e) => {
    const [x, y] = mpos(e), tip = $("map-tip");
    if (drag) {
      drag.bx = x; drag.by = y;
      if (Math.abs(x - drag.ax) + Math.abs(y - drag.ay) > 4) drag.moved = true;
      if (drag.moved) { tip.hidden = true; renderMap(); return; }
    }
    const i = nearest(x, y, 8);
    if (i < 0) { tip.hidden = true; return; }
    tip.hidden = false;
    tip.innerHTML = `<div class="th"></div><div>${esc(CLS[G[i]])} → ${esc(CLS[P[i]])}</div><div class="muted">${esc(idOf(i))}</div>`;
    setThumb(tip.firstChild, i, 64);
    tip.style.left = Math.min(MW - 120, x + 12) + "px"; tip.style.top = Math.min(MW - 110, y + 12) + "px";
  });
  canvas.addEventListener("mouseleave", () => { $("map-tip").hidden = true; });
  window.addEventListener("mouseup", (e) => {
    if (!drag) return;
    const d = drag; drag = null;
    if (d.moved) {
      const [xa, ya] = toData(d.ax, d.ay), [xb, yb] = toData(d.bx, d.by);
      const f = (v) => +v.toPrecision(6);
      set({box: [Math.min(xa, xb), Math.min(ya, yb), Math.max(xa, xb), Math.max(ya, yb)].map(f).join(",")});
    } else if (e.target === canvas) {
      const [x, y] = mpos(e), i = nearest(x, y, 8);
      if (i >= 0) set({open: idOf(i)});
    }
  });

  // ------------------------------------------------------------ card
  function rowOpen() { return S.open && ROW_OF.has(S.open) ? ROW_OF.get(S.open) : -1; }
  const fmt = (v) => v === null ? "—" : typeof v === "boolean" ? (v ? "yes" : "no")
    : typeof v === "number" ? (Number.isInteger(v) ? String(v) : v.toFixed(4)) : String(v);
  function jet(t) {  // [0,1] -> rgb of the jet colour map
    const c = (x) => Math.round(255 * Math.max(0, Math.min(1, x)));
    return [c(1.5 - Math.abs(4 * t - 3)), c(1.5 - Math.abs(4 * t - 2)), c(1.5 - Math.abs(4 * t - 1))];
  }
  function camCanvas(row, cam, which, px) {
    const cv = document.createElement("canvas"); cv.width = px; cv.height = px;
    const ctx = cv.getContext("2d");
    drawTile(ctx, row, 0, 0, px, px);
    const m = bytes(cam[which]), off = document.createElement("canvas");
    off.width = cam.w; off.height = cam.h;
    const octx = off.getContext("2d"), img = octx.createImageData(cam.w, cam.h);
    for (let k = 0; k < m.length; k++) { const [r, g, b] = jet(m[k] / 255); img.data.set([r, g, b, 255], 4 * k); }
    octx.putImageData(img, 0, 0);
    const overlay = () => { ctx.globalAlpha = 0.45; ctx.imageSmoothingEnabled = true; ctx.drawImage(off, 0, 0, px, px); ctx.globalAlpha = 1; };
    const p = place(row), im = sheetImgs[p.s];
    if (im.complete && im.naturalWidth) overlay(); else im.addEventListener("load", () => setTimeout(overlay), {once: true});
    return cv;
  }
  function scoreTable(i, cols, title) {
    if (!cols.length) return "";
    const show = (c) => { const v = value(c, i); return COL[c].t === "f32" && v !== null ? v.toFixed(4) : fmt(v); };
    const rows = cols.map((c) => `<tr><td>${esc(c)}</td><td class="v">${esc(show(c))}</td><td class="d">${esc(D.directions[c] || "")}</td></tr>`);
    return `<h3>${esc(title)}</h3><table class="kv">${rows.join("")}</table>`;
  }
  function renderCard() {
    const i = rowOpen(), back = $("card");
    if (i < 0) { back.hidden = true; return; }
    back.hidden = false;
    $("card-id").textContent = idOf(i);
    const pos = RESULT.indexOf(i);
    $("card-pos").textContent = pos >= 0 ? `${pos + 1} of ${RESULT.length}` : "(outside the current filter)";
    const left = document.createElement("div"), figs = document.createElement("div");
    figs.className = "figs";
    const big = document.createElement("canvas"); big.width = big.height = 192;
    drawTile(big.getContext("2d"), i, 0, 0, 192, 192);
    const f0 = document.createElement("figure"); f0.appendChild(big);
    f0.insertAdjacentHTML("beforeend", "<figcaption>image</figcaption>"); figs.appendChild(f0);
    const cam = D.cams[String(i)];
    if (cam) for (const [w, k] of [["given", cam.gc], ["pred", cam.pc]]) {
      const f = document.createElement("figure"); f.appendChild(camCanvas(i, cam, w, 192));
      f.insertAdjacentHTML("beforeend", `<figcaption>Grad-CAM, ${w === "given" ? "given" : "predicted"}: ${esc(CLS[k])}</figcaption>`);
      figs.appendChild(f);
    }
    left.appendChild(figs);
    left.insertAdjacentHTML("beforeend", neighboursHtml(i));
    left.querySelectorAll(".nb .th").forEach((el) => setThumb(el, +el.dataset.t, 64));
    const right = document.createElement("div");
    right.innerHTML = cardFacts(i);
    const body = $("card-body"); body.innerHTML = ""; body.appendChild(left); body.appendChild(right);
  }
  function neighboursHtml(i) {
    const nb = D.neighbors[String(i)];
    if (!nb) return '<p class="caption">No train neighbours stored for this example (the similarity stage keeps them for its hardest examples; run `hardprobe similarity --top N`).</p>';
    return "<h3>Nearest train neighbours</h3><div class=\"nbrs\">" + nb.map(([t, lab, sim, id]) =>
      `<div class="nb" title="${esc(id)}"><div class="th" data-t="${t}"></div><div class="${lab === G[i] ? "ok" : "bad"}">${esc(CLS[lab])}</div><div class="muted">sim ${(+sim).toFixed(3)}</div></div>`).join("") +
      "</div><p class=\"caption\">cosine similarity of the embeddings; green: same label as this example's given one.</p>";
  }
  function cardFacts(i) {
    const heads = Object.keys(COL).filter((c) => c.startsWith("pred_")).map((c) =>
      `${esc(c.slice(5))}: <b class="${COL[c].a[i] === G[i] ? "ok" : "bad"}">${esc(CLS[COL[c].a[i]] ?? COL[c].a[i])}</b>`);
    let h = `<p>given <b>${esc(CLS[G[i]])}</b> → predicted <b class="${CORRECT[i] ? "ok" : "bad"}">${esc(CLS[P[i]])}</b> (${esc(HEAD)}, primary)<br>
      <span class="muted">every head: ${heads.join(" · ")}</span></p>`;
    const other = ["split", "path", "failure_mode", "slice_id", "duplicate_group", "train_duplicate", "label_issue"].filter(has);
    h += '<table class="kv">' + other.map((c) => `<tr><td>${esc(c)}</td><td>${esc(fmt(value(c, i)))}</td></tr>`).join("") + "</table>";
    if (has("evidence") && value("evidence", i)) h += `<h3>Evidence</h3><div class="evidence">${esc(value("evidence", i))}</div>`;
    const nums = Object.keys(COL).filter((c) => !c.startsWith("_") && ["f32", "i32", "bool"].includes(COL[c].t) &&
      !/^(label|pred_|correct_|label_issue)$|^pred_|^correct_/.test(c) && !other.includes(c));
    const flip = nums.filter((c) => c.startsWith("flip_severity")), ft = nums.filter((c) => c.startsWith("ft_"));
    const main = nums.filter((c) => !flip.includes(c) && !ft.includes(c));
    h += scoreTable(i, main, "Scores");
    h += scoreTable(i, flip, "Flip severity per corruption");
    h += scoreTable(i, ft, "Training dynamics (fine-tuning)");
    return h;
  }
  function step(d) {
    if (!RESULT.length) return;
    const pos = RESULT.indexOf(rowOpen());
    const next = pos < 0 ? 0 : Math.max(0, Math.min(RESULT.length - 1, pos + d));
    set({open: idOf(RESULT[next])});
    scrollToPos(next);
  }
  function scrollToPos(pos) {
    const top = Math.floor(pos / gridCols) * CH;
    if (top < grid.scrollTop || top + CH > grid.scrollTop + grid.clientHeight) grid.scrollTop = top - CH;
  }
  $("card-prev").addEventListener("click", () => step(-1));
  $("card-next").addEventListener("click", () => step(1));
  $("card-close").addEventListener("click", () => set({open: ""}));
  $("card").addEventListener("click", (e) => { if (e.target === $("card")) set({open: ""}); });
  document.addEventListener("keydown", (e) => {
    if (e.target.tagName === "INPUT" || e.target.tagName === "SELECT") return;
    if (!S.open) { if (e.key === "Enter" && RESULT.length) set({open: idOf(RESULT[0])}); return; }
    if (e.key === "ArrowRight" || e.key === "j") { step(1); e.preventDefault(); }
    else if (e.key === "ArrowLeft" || e.key === "k") { step(-1); e.preventDefault(); }
    else if (e.key === "Escape") set({open: ""});
  });

  // ------------------------------------------------------------ update
  let lastFilterKey = "";
  function set(patch) {
    Object.assign(S, patch);
    update();
  }
  function update() {
    const fk = JSON.stringify(Object.assign({}, S, {open: "", color: ""}));
    if (fk !== lastFilterKey) {
      lastFilterKey = fk;
      applyFilter(S);
      $("count").textContent = `${RESULT.length.toLocaleString("en")} of ${N.toLocaleString("en")} examples`;
      $("count").dataset.n = RESULT.length;
      chips(); renderCM();
    }
    syncControls(); renderGrid(); renderMap(); renderCard(); writeHash();
  }
  function start() {
    $("title").textContent = D.title;
    document.title = D.title;
    $("report-link").href = D.report;
    if (D.problems.length) { $("problems-section").hidden = false;
      $("problems").innerHTML = D.problems.map((p) => `<li>${esc(p)}</li>`).join(""); }
    S = readHash();
    buildFilters(); setupMap(); update();
    const o = rowOpen(), pos = RESULT.indexOf(o);
    if (pos >= 0) scrollToPos(pos);
    window.addEventListener("hashchange", () => { S = readHash(); update(); });
    window.hp = {
      get state() { return Object.assign({}, S); }, set, rows: () => Array.from(RESULT),
      id: idOf, count: () => RESULT.length,
      mapPoint: (i) => HAS_MAP && Number.isFinite(MX[i]) ? {x: PX[i], y: PY[i]} : null,
      timeFilter(patch, reps) {  // ms per filter (filter + confusion counts) over all rows
        const st = Object.assign({}, S, patch); order(st.sort, st.desc);
        const t0 = performance.now();
        for (let r = 0; r < (reps || 1); r++) applyFilter(st);
        const ms = (performance.now() - t0) / (reps || 1);
        applyFilter(S);
        return ms;
      },
      timeScroll(steps) {  // ms per grid redraw while jumping through the whole result list
        const top = grid.scrollTop, t0 = performance.now(), n = steps || 50;
        for (let k = 0; k < n; k++) { grid.scrollTop = (k / n) * grid.scrollHeight; renderGrid(); }
        const ms = (performance.now() - t0) / n;
        grid.scrollTop = top; renderGrid();
        return ms;
      },
      readyAt: performance.now(),
    };
    document.body.dataset.ready = "1";
    // thumbnails: the sprite sheets decode off the main thread; this marks when all are in
    Promise.all(sheetImgs.map((im) => im.decode().catch(() => null))).then(() => {
      window.hp.imagesAt = performance.now(); renderGrid();
    });
  }
  start();
})();
