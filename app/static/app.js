// vitserve's page: plain JavaScript against the public API (API.md), no build step.
"use strict";

const $ = (id) => document.getElementById(id);

const state = {
  models: [], // ModelInfo objects from GET /v1/models
  model: null, // the selected ModelInfo
  image: null, // {blob, name}: what the analyses run on
  attention: null, // {grid, heatmap, region?, method} of the image on screen
  embedding: null, // {model, dim, vector, norm} of the image on screen (POST /v1/embed, pool=default)
  noPreview: false, // the browser cannot show the file: the heatmap comes as the server's PNG overlay
  lut: null, // Uint8Array(256 * 3): the colour map, the same table the server's PNGs use
  seq: 0, // bumped per image / per attention request, so late answers never overwrite newer ones
  attentionSeq: 0,
  embedSeq: 0,
  urls: {}, // object URLs in use, revoked when replaced
  retry: null,
};
window.vitserve = state; // for people (and tests) poking at the page from the console

// ------------------------------------------------------------------------------------------ API access

class ApiError extends Error {
  constructor(message, code, status) {
    super(message);
    this.code = code;
    this.status = status;
  }
}

function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function errorFrom(response) {
  let message = `The server answered ${response.status} ${response.statusText || ""}`.trim() + ".";
  let code = `http_${response.status}`;
  try {
    const body = await response.json();
    const error = body && body.error;
    if (typeof error === "string") message = error; // the v2 protocol's shape
    else if (error) {
      message = error.message || message;
      code = error.code || code;
    }
  } catch {
    // not JSON (a proxy's page, say): keep the status line
  }
  return new ApiError(message, code, response.status);
}

async function api(path, { method = "GET", body = null, as = "json" } = {}) {
  let response;
  try {
    response = await fetch(path, { method, body, headers: authHeaders() });
  } catch (err) {
    throw new ApiError(`Could not reach the server (${err.message}).`, "network_error", 0);
  }
  if (!response.ok) throw await errorFrom(response);
  return as === "blob" ? response.blob() : response.json();
}

function modelQuery(extra = {}) {
  const params = new URLSearchParams({ model: state.model.name, ...extra });
  return params.toString();
}

function imageForm() {
  const form = new FormData();
  form.append("images", state.image.blob, state.image.name);
  return form;
}

// ------------------------------------------------------------------------------------------ messages

function showError(err) {
  const message = err instanceof Error ? err.message : String(err);
  $("error-message").textContent = message;
  $("error-code").textContent = err && err.code ? `${err.code}${err.status ? ` · HTTP ${err.status}` : ""}` : "";
  $("error").hidden = false;
}

function hideError() {
  $("error").hidden = true;
}

function notice(text) {
  $("notice").textContent = text || "";
  $("notice").hidden = !text;
}

function setStatus(id, text, busy = false) {
  const el = $(id);
  el.textContent = text;
  el.classList.toggle("busy", busy);
}

function swapObjectURL(key, blob) {
  if (state.urls[key]) URL.revokeObjectURL(state.urls[key]);
  state.urls[key] = blob ? URL.createObjectURL(blob) : null;
  return state.urls[key];
}

// ------------------------------------------------------------------------------------------ models

async function loadColormap() {
  const response = await fetch("/static/colormaps.json");
  const table = (await response.json()).colormaps.viridis;
  // matplotlib's bytes=True conversion: truncate x * 255, so page and PNGs show the same colours
  state.lut = Uint8Array.from(table.flat(), (v) => Math.floor(v * 255));
}

async function loadModels() {
  clearTimeout(state.retry);
  try {
    const { models } = await api("/v1/models");
    notice("");
    state.models = models;
    const select = $("model-select");
    const previous = state.model && state.model.name;
    select.replaceChildren(
      ...models.map((m) => {
        const head = m.num_classes ? `${m.num_classes} classes` : "embeddings only";
        return new Option(`${m.name} (${m.image_size[0]}×${m.image_size[1]}, ${head})`, m.name);
      }),
    );
    if (models.some((m) => m.name === previous)) select.value = previous;
    select.disabled = models.length < 2;
    hideError();
    await selectModel(select.value);
  } catch (err) {
    if (err.code === "not_ready") {
      notice("The models are still loading; this page retries by itself.");
      state.retry = setTimeout(loadModels, 2000);
      return;
    }
    $("model-select").replaceChildren(new Option("unavailable"));
    showError(err);
  }
}

async function selectModel(name) {
  state.model = state.models.find((m) => m.name === name) || null;
  if (!state.model) return;
  fillAttentionSelectors(state.model);
  describeModel(state.model);
  describeEmbedding(state.model);
  loadMosaic();
  if (state.image) analyse();
}

function describeModel(m) {
  const p = m.preprocess || {};
  const facts = [
    `${m.name}: ${m.format}${m.family ? ` ${m.family}` : ""}`,
    `${m.depth} layers × ${m.num_heads} heads, width ${m.embed_dim}`,
    `${m.image_size[0]}×${m.image_size[1]} input, patch ${m.patch_size} (${m.grid[0]}×${m.grid[1]} grid)`,
    p.crop ? `resize ${p.resize}, crop ${p.crop.join("×")}` : null,
    `${m.device}, ${m.dtype}`,
  ];
  $("model-facts").textContent = facts.filter(Boolean).join(" · ");
}

// Whether the model has a class token to read (ModelInfo "prefix_tokens"; a server without it: assume one).
function hasClassToken(m) {
  return !m.prefix_tokens || m.prefix_tokens.class !== 0;
}

// The name /v1/attention gives the map for `method` ("cls" or "rollout") on this model's tokens
// (app/analysis.py): a class-token model reads its class token; without one, an attention-pooled (MAP) model
// is read through its probe and an average-pooled one through the patches' mean row.
function attentionMethodFor(m, method) {
  if (hasClassToken(m)) return method;
  if (m.pool === "map") return method === "cls" ? "probe" : "probe_rollout";
  return method === "cls" ? "mean" : "mean_rollout";
}

const METHOD_NOTES = {
  cls: "the class token's attention to each patch in the chosen layer",
  rollout: "the class token's attention rolled out through all layers",
  probe: "the attention-pooling (MAP) probe's attention to each patch; the probe is a layer of its own",
  probe_rollout: "the attention-pooling (MAP) probe's attention rolled out through all layers",
  mean: "the attention each patch receives, averaged over the patches, in the chosen layer (no class token is read)",
  mean_rollout: "the patches' mean attention rolled out through all layers (no class token is read)",
};

function showAttentionMethod(method) {
  const note = $("att-method");
  if (!method) {
    note.hidden = true;
    note.replaceChildren();
    return;
  }
  note.dataset.method = method;
  const text = METHOD_NOTES[method];
  note.replaceChildren("Method ", Object.assign(document.createElement("code"), { textContent: method }), text ? `: ${text}.` : ".");
  note.hidden = false;
}

function fillAttentionSelectors(m) {
  const layer = $("layer-select");
  const layers = [];
  for (let i = 0; i < m.depth; i++) layers.push(new Option(`Layer ${i + 1}${i === m.depth - 1 ? " (last)" : ""}`, String(i)));
  layer.replaceChildren(...layers);
  layer.value = String(m.depth - 1);
  const head = $("head-select");
  const heads = [new Option("Mean of all heads", "mean")];
  for (let h = 0; h < m.num_heads; h++) heads.push(new Option(`Head ${h + 1}`, String(h)));
  head.replaceChildren(...heads);
  // the options say what each method reads on this model's tokens
  let labels = ["Rollout (all layers)", "Class token (one layer)"];
  if (!hasClassToken(m)) {
    labels =
      m.pool === "map"
        ? ["Probe rollout (all layers)", "Pooling probe (own layer)"]
        : ["Patch mean rollout (all layers)", "Patch mean (one layer)"];
  }
  const options = $("method-select").options;
  for (const option of options) option.text = option.value === "rollout" ? labels[0] : labels[1];
  syncMethodControls();
}

function syncMethodControls() {
  const perLayer = $("method-select").value === "cls"; // rollout spans every layer and head-averages
  const probe = state.model && attentionMethodFor(state.model, "cls") === "probe"; // a layer of its own: none to pick
  $("layer-select").disabled = !perLayer || probe;
  $("head-select").disabled = !perLayer;
}

async function loadMosaic() {
  const model = state.model;
  setStatus("mosaic-status", "computing…", true);
  try {
    const blob = await api(`/v1/models/${encodeURIComponent(model.name)}/position-similarity?format=png`, { as: "blob" });
    if (model !== state.model) return;
    const img = $("mosaic");
    img.src = swapObjectURL("mosaic", blob);
    img.hidden = false;
    setStatus("mosaic-status", `${model.grid[0]}×${model.grid[1]} positions`);
  } catch (err) {
    setStatus("mosaic-status", "unavailable");
    showError(err);
  }
}

// ------------------------------------------------------------------------------------------ one image through the API

function setImage(blob, name) {
  state.image = { blob, name };
  state.attention = null;
  state.embedding = null;
  state.noPreview = false;
  const img = $("input-image");
  delete img.dataset.overlay;
  img.src = swapObjectURL("input", blob);
  const current = $("current");
  current.replaceChildren("Showing ", Object.assign(document.createElement("strong"), { textContent: name }));
  current.hidden = false;
  $("stage").hidden = false;
  $("viewer-empty").hidden = true;
  clearHeatmap();
  analyse();
}

function analyse() {
  if (!state.image || !state.model) return;
  hideError();
  const seq = ++state.seq;
  classify(seq);
  embed(seq);
  loadAttention();
  loadDistance(seq);
  searchSimilar();
}

async function classify(seq) {
  const model = state.model;
  if (!model.num_classes) {
    renderPredictions([]); // the card stays hidden: the embedding card stands in its place
    setStatus("pred-status", "");
    return;
  }
  setStatus("pred-status", "classifying…", true);
  try {
    const topK = Math.min(5, model.num_classes);
    const data = await api(`/v1/classify?${modelQuery({ top_k: topK })}`, { method: "POST", body: imageForm() });
    if (seq !== state.seq) return;
    renderPredictions(data.results[0].predictions);
    setStatus("pred-status", `${data.model}`);
  } catch (err) {
    if (seq !== state.seq) return;
    renderPredictions([]);
    $("pred-empty").textContent = "No predictions for this image.";
    setStatus("pred-status", "failed");
    showError(err);
  }
}

function percent(score) {
  const p = score * 100;
  if (p > 0 && p < 0.1) return "<0.1%";
  return `${p.toFixed(1)}%`;
}

function renderPredictions(predictions) {
  const list = $("predictions");
  list.replaceChildren(
    ...predictions.map((p) => {
      const item = document.createElement("li");
      item.className = "bar-item";
      const label = document.createElement("span");
      label.className = "bar-label";
      label.textContent = p.label;
      label.title = `${p.label} (class ${p.index})`;
      const value = document.createElement("span");
      value.className = "bar-value";
      value.textContent = percent(p.score);
      const track = document.createElement("div");
      track.className = "bar-track";
      track.setAttribute("role", "meter");
      track.setAttribute("aria-label", `${p.label} probability`);
      track.setAttribute("aria-valuemin", "0");
      track.setAttribute("aria-valuemax", "100");
      track.setAttribute("aria-valuenow", (p.score * 100).toFixed(1));
      const fill = document.createElement("div");
      fill.className = "bar-fill";
      fill.style.width = `${Math.max(0, Math.min(100, p.score * 100))}%`;
      track.append(fill);
      item.append(label, value, track);
      return item;
    }),
  );
  $("pred-empty").hidden = predictions.length > 0;
}

async function loadAttention() {
  if (!state.image || !state.model) return;
  const seq = ++state.attentionSeq;
  const method = $("method-select").value;
  // a file this browser cannot show (TIFF, say): ask the server to draw the overlay instead
  const format = state.noPreview ? "png" : "json";
  const params = { method, format };
  if (method === "cls") {
    params.layer = $("layer-select").value;
    params.head = $("head-select").value;
  }
  setStatus("att-status", "computing…", true);
  try {
    const request = { method: "POST", body: imageForm(), as: format === "png" ? "blob" : "json" };
    const data = await api(`/v1/attention?${modelQuery(params)}`, request);
    if (seq !== state.attentionSeq) return;
    if (format === "png") {
      const named = attentionMethodFor(state.model, method); // a PNG does not name its method: ModelInfo does
      showServerOverlay(data);
      showAttentionMethod(named);
      setStatus("att-status", `${describeWhere(named)} (drawn by the server)`);
      return;
    }
    const result = data.results[0];
    const named = result.method || attentionMethodFor(state.model, method);
    state.attention = { grid: result.grid, heatmap: result.heatmap, region: result.region || null, method: named };
    drawHeatmap();
    showAttentionMethod(named);
    setStatus("att-status", describeWhere(named));
  } catch (err) {
    if (seq !== state.attentionSeq) return;
    clearHeatmap();
    showAttentionMethod(null);
    if (state.noPreview) showNoPreview();
    setStatus("att-status", "failed");
    showError(err);
  }
}

function showServerOverlay(blob) {
  const img = $("input-image");
  img.dataset.overlay = "1";
  img.src = swapObjectURL("input", blob);
  $("stage").hidden = false;
  $("viewer-empty").hidden = true;
}

function showNoPreview() {
  $("stage").hidden = true;
  $("viewer-empty").textContent = "This file cannot be shown as an image.";
  $("viewer-empty").hidden = false;
}

// The browser could not decode the file: the server may still (TIFF), or may refuse it (a broken file).
function onPreviewError() {
  if (!state.image) return;
  if ($("input-image").dataset.overlay) {
    showNoPreview();
    return;
  }
  state.noPreview = true;
  state.attention = null;
  clearHeatmap();
  loadAttention();
}

function describeLayerHead() {
  const layer = $("layer-select");
  const head = $("head-select");
  return `${layer.options[layer.selectedIndex].text}, ${head.options[head.selectedIndex].text.toLowerCase()}`;
}

function describeWhere(method) {
  if (method.endsWith("rollout")) return "rollout over all layers";
  if (method === "probe") {
    const head = $("head-select");
    return `pooling probe, ${head.options[head.selectedIndex].text.toLowerCase()}`;
  }
  return describeLayerHead();
}

// ------------------------------------------------------------------------------------------ the embedding

const POOL_NAMES = {
  cls: "class token",
  mean: "patch mean",
  map: "attention (MAP)",
};

// What the model info says about its embedding, before (and beside) any image's vector.
function describeEmbedding(m) {
  const headless = !m.num_classes;
  $("predictions-card").hidden = headless;
  $("embed-card").classList.toggle("compact", !headless);
  const about = $("embed-about");
  about.hidden = !headless;
  about.textContent = headless
    ? `${m.name} has no classification head: it embeds images. This is its vector for the image (POST /v1/embed), for search, clustering or a classifier of your own.`
    : "";
  $("embed-family").textContent = m.family || "vit";
  const pool = m.pool || "cls";
  $("embed-pool").textContent = POOL_NAMES[pool] || pool;
  $("embed-pool").title = `pool: ${pool}`;
  const dim = m.embedding_dim || m.embed_dim;
  $("embed-dim").textContent = dim === m.embed_dim ? String(dim) : `${dim} (projected from ${m.embed_dim})`;
  renderEmbedding(null);
}

function formatNumber(x) {
  if (x === 0) return "0";
  const a = Math.abs(x);
  return a >= 1e4 || a < 1e-3 ? x.toExponential(3) : String(Number(x.toPrecision(5)));
}

async function embed(seq) {
  const model = state.model;
  const embedSeq = ++state.embedSeq;
  setStatus("embed-status", "embedding…", true);
  try {
    const data = await api(`/v1/embed?${modelQuery({ pool: "default" })}`, { method: "POST", body: imageForm() });
    if (seq !== state.seq || embedSeq !== state.embedSeq) return;
    const vector = data.results[0].embedding;
    const norm = Math.sqrt(vector.reduce((sum, v) => sum + v * v, 0));
    state.embedding = { model: data.model, dim: data.dim, vector, norm };
    renderEmbedding(state.embedding);
    setStatus("embed-status", model.num_classes ? "pool=default" : `${data.model}`);
  } catch (err) {
    if (seq !== state.seq || embedSeq !== state.embedSeq) return;
    state.embedding = null;
    renderEmbedding(null);
    $("embed-empty").textContent = "No embedding for this image.";
    setStatus("embed-status", "failed");
    showError(err);
  }
}

function renderEmbedding(e) {
  $("embed-copied").textContent = "";
  $("embed-copy").disabled = !e;
  $("embed-figure").hidden = !e;
  $("embed-empty").hidden = !!e;
  $("embed-probe").textContent = "";
  if (!e) {
    $("embed-norm").textContent = "–";
    $("embed-empty").textContent = "Give an image to see its embedding (POST /v1/embed).";
    delete $("embed-strip").dataset.drawn;
    return;
  }
  const m = state.model;
  $("embed-dim").textContent = m && m.embed_dim !== e.dim ? `${e.dim} (projected from ${m.embed_dim})` : String(e.dim);
  $("embed-norm").textContent = formatNumber(e.norm);
  const lo = Math.min(...e.vector);
  const hi = Math.max(...e.vector);
  $("embed-range").textContent = `${e.dim} values, from ${formatNumber(lo)} to ${formatNumber(hi)}`;
  $("embed-strip").setAttribute(
    "aria-label",
    `The embedding's ${e.dim} values as bars around zero, from ${formatNumber(lo)} to ${formatNumber(hi)}`,
  );
  drawStrip();
}

// The vector as a strip of bars around a zero line: positive up in the accent colour, negative down in
// viridis' dark end; with more values than pixel columns, each column shows the extremes of its values.
function drawStrip() {
  const canvas = $("embed-strip");
  const e = state.embedding;
  if (!e || !canvas.clientWidth) return;
  const ratio = window.devicePixelRatio || 1;
  const width = Math.round(canvas.clientWidth * ratio);
  const height = Math.round(canvas.clientHeight * ratio);
  canvas.width = width;
  canvas.height = height;
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, width, height);
  const n = e.vector.length;
  const scale = Math.max(...e.vector.map(Math.abs)) || 1;
  const mid = height / 2;
  const reach = mid - ratio; // a pixel of air above and below
  const columns = Math.min(n, width);
  const step = width / columns;
  const gap = step >= 4 * ratio ? ratio : 0; // separate bars only where they are wide enough
  for (let c = 0; c < columns; c++) {
    const from = Math.floor((c * n) / columns);
    const to = Math.max(from + 1, Math.floor(((c + 1) * n) / columns));
    let up = 0;
    let down = 0;
    for (let i = from; i < to; i++) {
      up = Math.max(up, e.vector[i]);
      down = Math.min(down, e.vector[i]);
    }
    const x = c * step;
    const w = Math.max(step - gap, 1);
    if (up > 0) {
      ctx.fillStyle = "#21918c";
      const h = Math.max((up / scale) * reach, ratio);
      ctx.fillRect(x, mid - h, w, h);
    }
    if (down < 0) {
      ctx.fillStyle = "#440154";
      const h = Math.max((-down / scale) * reach, ratio);
      ctx.fillRect(x, mid, w, h);
    }
  }
  ctx.fillStyle = "rgba(29, 35, 48, 0.25)";
  ctx.fillRect(0, Math.round(mid) - Math.floor(ratio / 2), width, Math.max(1, Math.round(ratio / 2)));
  canvas.dataset.drawn = "1";
}

function probeStrip(event) {
  const e = state.embedding;
  const canvas = $("embed-strip");
  if (!e || !canvas.clientWidth) return;
  const rect = canvas.getBoundingClientRect();
  const i = Math.min(e.vector.length - 1, Math.max(0, Math.floor(((event.clientX - rect.left) / rect.width) * e.vector.length)));
  $("embed-probe").textContent = `[${i}] = ${formatNumber(e.vector[i])}`;
}

async function copyEmbedding() {
  const e = state.embedding;
  if (!e) return;
  const text = JSON.stringify(e.vector);
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    // no clipboard API (an http page on another host, say): the older way, through a selected text field
    const area = Object.assign(document.createElement("textarea"), { value: text, readOnly: true });
    area.className = "visually-hidden";
    document.body.append(area);
    area.select();
    const copied = document.execCommand("copy");
    area.remove();
    if (!copied) {
      $("embed-copied").textContent = "copying is not allowed here";
      return;
    }
  }
  $("embed-copied").textContent = `copied ${e.dim} numbers`;
}

async function loadDistance(seq) {
  setStatus("dist-status", "computing…", true);
  try {
    const blob = await api(`/v1/attention-distance?${modelQuery({ format: "png" })}`, {
      method: "POST",
      body: imageForm(),
      as: "blob",
    });
    if (seq !== state.seq) return;
    const img = $("distance-plot");
    img.src = swapObjectURL("distance", blob);
    img.hidden = false;
    $("dist-empty").hidden = true;
    setStatus("dist-status", "");
  } catch (err) {
    if (seq !== state.seq) return;
    $("distance-plot").hidden = true;
    $("dist-empty").hidden = false;
    setStatus("dist-status", "failed");
    showError(err);
  }
}

// ------------------------------------------------------------------------------------------ the heatmap

// Python's round(): half to even, as torchvision's centre crop rounds.
function roundHalfEven(x) {
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

// The box of the original image the model sees after resize + centre crop (app/preprocess.py seen_region);
// used only when the server's attention JSON does not carry its own "region".
function seenRegion(width, height, pre) {
  if (!pre || pre.resize == null) return [0, 0, width, height];
  let rw;
  let rh;
  if (Array.isArray(pre.resize)) [rh, rw] = pre.resize;
  else if (width <= height) [rw, rh] = [pre.resize, Math.trunc((pre.resize * height) / width)];
  else [rw, rh] = [Math.trunc((pre.resize * width) / height), pre.resize];
  let box = [0, 0, rw, rh];
  if (pre.crop) {
    const [ch, cw] = pre.crop;
    const round = pre.crop_rounding === "floor" ? Math.floor : roundHalfEven; // transformers floors
    const top = round((rh - ch) / 2);
    const left = round((rw - cw) / 2);
    box = [left, top, left + cw, top + ch];
  }
  const sx = width / rw;
  const sy = height / rh;
  return [box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy];
}

function clearHeatmap() {
  const canvas = $("heatmap");
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  delete canvas.dataset.drawn;
}

// Keys' cubic convolution (a = -0.5), the kernel of Pillow's BICUBIC, which the server's overlays use.
function cubic(x) {
  const a = -0.5;
  x = Math.abs(x);
  if (x < 1) return ((a + 2) * x - (a + 3)) * x * x + 1;
  if (x < 2) return (((x - 5) * x + 8) * x - 4) * a;
  return 0;
}

// Per output pixel: the first input index and the normalised weights, as Pillow's precompute_coeffs
// computes them when enlarging (so page and PNG overlays agree to a rounding).
function resampleWeights(inSize, outSize) {
  const scale = inSize / outSize;
  const filterScale = Math.max(scale, 1);
  const support = 2 * filterScale;
  const table = [];
  for (let o = 0; o < outSize; o++) {
    const centre = (o + 0.5) * scale;
    const lo = Math.max(0, Math.trunc(centre - support + 0.5));
    const hi = Math.min(inSize, Math.trunc(centre + support + 0.5));
    const weights = [];
    let sum = 0;
    for (let i = lo; i < hi; i++) {
      const w = cubic((i - centre + 0.5) / filterScale);
      weights.push(w);
      sum += w;
    }
    table.push({ lo, weights: weights.map((w) => (sum ? w / sum : 0)) });
  }
  return table;
}

// (gh, gw) map -> Float32Array(height * width): bicubic, rows first then columns, clipped to [0, 1].
function upsample(heatmap, grid, width, height) {
  const [gh, gw] = grid;
  const across = resampleWeights(gw, width);
  const down = resampleWeights(gh, height);
  const rows = new Float32Array(gh * width);
  for (let i = 0; i < gh; i++) {
    for (let x = 0; x < width; x++) {
      const { lo, weights } = across[x];
      let v = 0;
      for (let k = 0; k < weights.length; k++) v += weights[k] * heatmap[i][lo + k];
      rows[i * width + x] = v;
    }
  }
  const out = new Float32Array(width * height);
  for (let y = 0; y < height; y++) {
    const { lo, weights } = down[y];
    for (let x = 0; x < width; x++) {
      let v = 0;
      for (let k = 0; k < weights.length; k++) v += weights[k] * rows[(lo + k) * width + x];
      out[y * width + x] = Math.min(1, Math.max(0, v));
    }
  }
  return out;
}

// The region rounded to whole pixels inside the canvas, as app/visuals.py does (_pixel_box).
function pixelBox(region, width, height) {
  let [left, top, right, bottom] = region.map(roundHalfEven);
  left = Math.min(Math.max(left, 0), width - 1);
  top = Math.min(Math.max(top, 0), height - 1);
  right = Math.min(Math.max(right, left + 1), width);
  bottom = Math.min(Math.max(bottom, top + 1), height);
  return [left, top, right, bottom];
}

function colourise(values, width, height, ctx) {
  const pixels = ctx.createImageData(width, height);
  for (let p = 0; p < values.length; p++) {
    const k = Math.min(255, Math.floor(values[p] * 256)); // matplotlib's indexing of a 256-entry table
    pixels.data[p * 4] = state.lut[k * 3];
    pixels.data[p * 4 + 1] = state.lut[k * 3 + 1];
    pixels.data[p * 4 + 2] = state.lut[k * 3 + 2];
    pixels.data[p * 4 + 3] = 255;
  }
  return pixels;
}

function describeImage() {
  const img = $("input-image");
  if (!img.naturalWidth) return;
  $("stage").style.setProperty("--aspect", String(img.naturalWidth / img.naturalHeight));
  if (state.image && !img.dataset.overlay) {
    $("current").replaceChildren(
      "Showing ",
      Object.assign(document.createElement("strong"), { textContent: state.image.name }),
      ` (${img.naturalWidth}×${img.naturalHeight} pixels)`,
    );
  }
}

function drawHeatmap() {
  const img = $("input-image");
  const att = state.attention;
  if (!att || !state.lut || !img.complete || !img.naturalWidth) return; // drawn again when the image loads
  const canvas = $("heatmap");
  const scale = Math.min(1, 1024 / Math.max(img.naturalWidth, img.naturalHeight));
  canvas.width = Math.round(img.naturalWidth * scale);
  canvas.height = Math.round(img.naturalHeight * scale);
  const region = (att.region || seenRegion(img.naturalWidth, img.naturalHeight, state.model.preprocess)).map(
    (v) => v * scale,
  );
  const [left, top, right, bottom] = pixelBox(region, canvas.width, canvas.height);
  const ctx = canvas.getContext("2d");
  // dim what the model never saw (outside the crop), then paint the smooth heatmap onto what it saw
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.fillStyle = "rgba(0, 0, 0, 0.6)";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  const width = right - left;
  const height = bottom - top;
  ctx.putImageData(colourise(upsample(att.heatmap, att.grid, width, height), width, height, ctx), left, top);
  canvas.dataset.drawn = "1";
}

// ------------------------------------------------------------------------------------------ input: files, drops, pastes

function wireUpload() {
  const input = $("file-input");
  input.addEventListener("change", () => {
    if (input.files && input.files[0]) setImage(input.files[0], input.files[0].name);
    input.value = ""; // choosing the same file again still fires
  });
  const zone = $("dropzone");
  for (const type of ["dragenter", "dragover"]) {
    zone.addEventListener(type, (e) => {
      e.preventDefault();
      zone.classList.add("over");
    });
  }
  for (const type of ["dragleave", "drop"]) zone.addEventListener(type, () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    const file = e.dataTransfer && e.dataTransfer.files[0];
    if (file) setImage(file, file.name);
  });
  window.addEventListener("paste", (e) => {
    const item = [...(e.clipboardData ? e.clipboardData.items : [])].find((i) => i.type.startsWith("image/"));
    if (item) setImage(item.getAsFile(), "pasted image");
  });
}

// ------------------------------------------------------------------------------------------ input: drawing

function wireDrawing() {
  const canvas = $("draw-canvas");
  const ctx = canvas.getContext("2d");
  let drawing = false;
  let last = null;
  let inked = false;

  const clear = () => {
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    inked = false;
  };
  const point = (e) => {
    const rect = canvas.getBoundingClientRect();
    return [((e.clientX - rect.left) * canvas.width) / rect.width, ((e.clientY - rect.top) * canvas.height) / rect.height];
  };
  const stroke = (from, to) => {
    ctx.strokeStyle = "#000";
    ctx.lineWidth = canvas.width / 12; // thick, like a pen stroke on a 28-pixel digit
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.beginPath();
    ctx.moveTo(...from);
    ctx.lineTo(...to);
    ctx.stroke();
    inked = true;
  };

  canvas.addEventListener("pointerdown", (e) => {
    drawing = true;
    canvas.setPointerCapture(e.pointerId);
    last = point(e);
    stroke(last, last);
  });
  canvas.addEventListener("pointermove", (e) => {
    if (!drawing) return;
    const next = point(e);
    stroke(last, next);
    last = next;
  });
  for (const type of ["pointerup", "pointercancel"]) canvas.addEventListener(type, () => (drawing = false));

  $("draw-clear").addEventListener("click", clear);
  $("draw-classify").addEventListener("click", () => {
    if (!inked) {
      notice("Draw something first: the canvas is empty.");
      return;
    }
    notice("");
    canvas.toBlob((blob) => setImage(blob, "drawing.png"), "image/png");
  });
  clear();
}

function wireTabs() {
  const tabs = [
    [$("tab-upload"), $("panel-upload")],
    [$("tab-draw"), $("panel-draw")],
  ];
  for (const [tab] of tabs) {
    tab.addEventListener("click", () => {
      for (const [other, panel] of tabs) {
        const on = other === tab;
        other.setAttribute("aria-selected", String(on));
        panel.hidden = !on;
      }
    });
  }
}

// ------------------------------------------------------------------------------------------ controls

function wireControls() {
  $("model-select").addEventListener("change", (e) => selectModel(e.target.value));
  $("method-select").addEventListener("change", () => {
    syncMethodControls();
    loadAttention();
  });
  $("layer-select").addEventListener("change", loadAttention);
  $("head-select").addEventListener("change", loadAttention);
  const opacity = $("opacity");
  const applyOpacity = () => {
    $("heatmap").style.opacity = String(opacity.value / 100);
    $("opacity-value").textContent = `${opacity.value}%`;
  };
  opacity.addEventListener("input", applyOpacity);
  applyOpacity();
  $("input-image").addEventListener("load", () => {
    describeImage();
    drawHeatmap();
  });
  $("input-image").addEventListener("error", onPreviewError);
  $("embed-copy").addEventListener("click", copyEmbedding);
  $("embed-strip").addEventListener("pointermove", probeStrip);
  $("embed-strip").addEventListener("pointerleave", () => ($("embed-probe").textContent = ""));
  new ResizeObserver(() => drawStrip()).observe($("embed-strip"));
  $("error-close").addEventListener("click", hideError);

  const key = $("api-key");
  key.value = sessionStorage.getItem("vitserve-api-key") || "";
  const commitKey = () => {
    sessionStorage.setItem("vitserve-api-key", key.value.trim());
    loadModels().then(() => loadCollections());
  };
  key.addEventListener("change", commitKey);
  $("settings").addEventListener("submit", (e) => {
    e.preventDefault(); // Enter in the key field: use the key now, stay on the page
    commitKey();
  });
}

// ------------------------------------------------------------------------------------------ similar images

async function loadCollections(keep) {
  const select = $("collection-select");
  const chosen = keep || select.value;
  let collections = [];
  try {
    collections = (await api("/v1/collections")).collections;
  } catch (err) {
    setStatus("similar-status", err.status === 503 ? "image search unavailable" : "");
    if (err.status !== 503 && err.status !== 401) showError(err);
  }
  const options = [new Option("none", "")];
  for (const c of collections) {
    options.push(new Option(`${c.name} (${c.model}, ${c.count} images)`, c.name));
  }
  select.replaceChildren(...options);
  if (collections.some((c) => c.name === chosen)) select.value = chosen;
  $("similar-add").disabled = !select.value || !state.image;
}

function similarK() {
  const k = Number.parseInt($("similar-k").value, 10);
  return Number.isFinite(k) ? Math.min(Math.max(k, 1), 1000) : 8;
}

async function searchSimilar() {
  const name = $("collection-select").value;
  $("similar-add").disabled = !name || !state.image;
  if (!name || !state.image) {
    renderSimilar(null, []);
    return;
  }
  const seq = ++state.similarSeq;
  setStatus("similar-status", "searching…", true);
  try {
    const path = `/v1/collections/${encodeURIComponent(name)}/search?k=${similarK()}`;
    const data = await api(path, { method: "POST", body: imageForm() });
    if (seq !== state.similarSeq) return;
    await renderSimilar(name, data.results, seq);
    setStatus("similar-status", `${data.results.length} found in ${data.took_ms.toFixed(0)} ms`);
  } catch (err) {
    if (seq !== state.similarSeq) return;
    renderSimilar(null, []);
    setStatus("similar-status", "failed");
    showError(err);
  }
}

async function renderSimilar(name, results, seq) {
  for (const url of state.thumbURLs) URL.revokeObjectURL(url);
  state.thumbURLs = [];
  const items = [];
  for (const r of results) {
    const li = document.createElement("li");
    li.className = "match";
    li.dataset.id = r.id;
    const img = document.createElement("img");
    img.alt = `Thumbnail of ${r.id}`;
    img.width = 96;
    img.height = 96;
    const caption = document.createElement("div");
    caption.className = "match-caption";
    const id = Object.assign(document.createElement("strong"), { textContent: r.id, title: r.id });
    const score = Object.assign(document.createElement("span"), {
      className: "score",
      textContent: r.score.toFixed(3),
    });
    const meta = Object.assign(document.createElement("code"), {
      className: "meta",
      textContent: Object.keys(r.metadata || {}).length ? JSON.stringify(r.metadata) : "",
    });
    caption.append(id, score, meta);
    li.append(img, caption);
    items.push(li);
  }
  $("similar").replaceChildren(...items);
  $("similar-empty").hidden = items.length > 0;
  if (!name) return;
  await Promise.all(
    results.map(async (r, i) => {
      const path = `/v1/collections/${encodeURIComponent(name)}/items/${encodeURIComponent(r.id)}/thumbnail`;
      try {
        const blob = await api(path, { as: "blob" });
        if (seq !== state.similarSeq) return;
        const url = URL.createObjectURL(blob);
        state.thumbURLs.push(url);
        items[i].querySelector("img").src = url;
      } catch {
        items[i].classList.add("no-thumbnail"); // none kept for this item (or a vector added without an image)
      }
    }),
  );
}

async function addToCollection() {
  const name = $("collection-select").value;
  if (!name || !state.image) return;
  setStatus("similar-status", "adding…", true);
  try {
    const form = imageForm();
    form.append("metadata", JSON.stringify([{ filename: state.image.name }]));
    const data = await api(`/v1/collections/${encodeURIComponent(name)}/images`, { method: "POST", body: form });
    setStatus("similar-status", `added ${data.ids[0]}`);
    await loadCollections(name);
    await searchSimilar();
  } catch (err) {
    setStatus("similar-status", "failed");
    showError(err);
  }
}

async function createCollection(event) {
  event.preventDefault();
  const name = $("collection-name").value.trim();
  if (!name || !state.model) return;
  try {
    const response = await fetch("/v1/collections", {
      method: "POST",
      headers: { ...authHeaders(), "Content-Type": "application/json" },
      body: JSON.stringify({ name, model: state.model.name }),
    });
    if (!response.ok) throw await errorFrom(response);
    $("collection-name").value = "";
    await loadCollections(name);
    await searchSimilar();
  } catch (err) {
    showError(err);
  }
}

function wireSimilar() {
  state.similarSeq = 0;
  state.thumbURLs = [];
  $("collection-select").addEventListener("change", searchSimilar);
  $("similar-k").addEventListener("change", searchSimilar);
  $("similar-add").addEventListener("click", addToCollection);
  $("collection-form").addEventListener("submit", createCollection);
}

async function main() {
  wireTabs();
  wireUpload();
  wireDrawing();
  wireControls();
  wireSimilar();
  try {
    await loadColormap();
  } catch (err) {
    showError(new ApiError(`Could not load the colour map (${err.message}).`, "page_error", 0));
  }
  await loadModels();
  await loadCollections();
}

main();
