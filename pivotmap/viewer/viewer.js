// pivotmap viewer: the published land-cover maps on a plain background (nothing is fetched from
// outside this server). Reads viewer.json (versions, layers, legends) written by `pivotmap serve`.
"use strict";

const base = location.href.replace(/[?#].*$/, "").replace(/[^/]*$/, "");
const state = { config: null, version: null, layer: null, opacity: 0.85, lastClick: null };
const $ = (id) => document.getElementById(id);

function url(template) { return base + template; }

function hexColor(hint) { return "#" + (hint || "888888"); }

function currentVersion() {
  return state.config.versions.find((v) => v.version === state.version);
}

function currentLayer() {
  return currentVersion().layers.find((l) => l.key === state.layer) || currentVersion().layers[0];
}

function boundsOf(v) { return [[v.bbox[0], v.bbox[1]], [v.bbox[2], v.bbox[3]]]; }

const map = new maplibregl.Map({
  container: "map",
  style: {
    version: 8,
    sources: {},
    layers: [{ id: "background", type: "background", paint: { "background-color": "#e9ecef" } }],
  },
  center: [0, 0],
  zoom: 1,
  attributionControl: false,
  preserveDrawingBuffer: true, // lets a screenshot read the canvas
});
const mapLoaded = new Promise((resolve) => map.once("load", resolve));
map.addControl(new maplibregl.NavigationControl({ showCompass: false }), "top-right");
map.addControl(new maplibregl.ScaleControl({ unit: "metric" }), "bottom-right");

function showLayer() {
  const v = currentVersion();
  const layer = currentLayer();
  state.layer = layer.key;
  if (map.getLayer("map")) map.removeLayer("map");
  if (map.getSource("map")) map.removeSource("map");
  map.addSource("map", {
    type: "raster",
    tiles: [url(layer.tiles)],
    tileSize: 256,
    bounds: v.bbox,
    maxzoom: 18,
  });
  map.addLayer({
    id: "map",
    type: "raster",
    source: "map",
    paint: { "raster-opacity": state.opacity, "raster-resampling": "nearest", "raster-fade-duration": 0 },
  });
  document.body.dataset.ready = "";
  map.once("idle", () => { document.body.dataset.ready = `${state.version}/${state.layer}`; });
  renderLegend();
  renderDownload();
}

function renderVersions() {
  const select = $("version");
  select.innerHTML = "";
  for (const v of state.config.versions) {
    const opt = document.createElement("option");
    opt.value = v.version;
    opt.textContent = v.current ? `${v.version} (current)` : v.version;
    select.appendChild(opt);
  }
  select.value = state.version;
}

function renderLayers() {
  const box = $("layers");
  box.innerHTML = "";
  for (const layer of currentVersion().layers) {
    const label = document.createElement("label");
    const input = document.createElement("input");
    input.type = "radio";
    input.name = "layer";
    input.value = layer.key;
    input.checked = layer.key === state.layer;
    input.addEventListener("change", () => { state.layer = layer.key; showLayer(); });
    label.append(input, document.createTextNode(layer.title));
    box.appendChild(label);
  }
}

function renderLegend() {
  const box = $("legend");
  box.innerHTML = "";
  const layer = currentLayer();
  if (layer.kind === "classes") {
    for (const c of currentVersion().classes) {
      const row = document.createElement("div");
      row.className = "legend-row";
      row.dataset.value = c.value;
      row.dataset.color = hexColor(c.color_hint);
      const sw = document.createElement("span");
      sw.className = "swatch";
      sw.style.background = hexColor(c.color_hint);
      row.append(sw, document.createTextNode(`${c.title || c.name} (${c.value})`));
      row.title = c.description || "";
      box.appendChild(row);
    }
    return;
  }
  if (layer.kind === "index") {
    for (const c of layer.categories) {
      const row = document.createElement("div");
      row.className = "legend-row";
      const sw = document.createElement("span");
      sw.className = "swatch";
      sw.style.background = c.color;
      row.append(sw, document.createTextNode(c.name));
      box.appendChild(row);
    }
    const note = document.createElement("p");
    note.className = "note";
    note.textContent = "The input variable that weighed most in the prediction (per cell); click for its month.";
    box.appendChild(note);
    return;
  }
  const ramp = document.createElement("div");
  ramp.className = "ramp";
  ramp.style.background = `linear-gradient(to right, ${state.config.ramp.stops.join(", ")})`;
  const labels = document.createElement("div");
  labels.className = "ramp-labels";
  labels.innerHTML = `<span>0 %</span><span>${layer.title}</span><span>100 %</span>`;
  box.append(ramp, labels);
}

function viewBbox() {
  const b = map.getBounds();
  const v = currentVersion().bbox;
  const w = Math.max(b.getWest(), v[0]), s = Math.max(b.getSouth(), v[1]);
  const e = Math.min(b.getEast(), v[2]), n = Math.min(b.getNorth(), v[3]);
  return w < e && s < n ? [w, s, e, n].map((x) => x.toFixed(6)) : null;
}

function renderDownload() {
  const bbox = viewBbox();
  const link = $("download");
  const layer = currentLayer();
  if (!bbox) {
    link.setAttribute("aria-disabled", "true");
    link.removeAttribute("href");
    $("command").textContent = "The view does not overlap the map.";
    return;
  }
  link.removeAttribute("aria-disabled");
  link.href = url(layer.download.replace("{bbox}", bbox.join(",")));
  link.download = `${state.version}_${layer.key}.tif`;
  const v = currentVersion();
  $("command").textContent = v.current
    ? `pivotmap download --catalog ${state.config.catalog} --bbox ${bbox.join(",")} ` +
      `--out ${state.version}_${layer.key}.tif --asset ${layer.key}`
    : `The command line downloads the current version; make this one current with ` +
      `pivotmap rollback ${v.version} --out ${state.config.run} (then restart pivotmap serve).`;
}

async function readPoint(layerKey, lngLat) {
  const layer = currentVersion().layers.find((l) => l.key === layerKey);
  if (!layer) return null;
  const path = layer.point.replace("{lon}", lngLat.lng.toFixed(7)).replace("{lat}", lngLat.lat.toFixed(7));
  const answer = await fetch(url(path));
  if (!answer.ok) return null; // outside the map
  const body = await answer.json();
  return body.values;
}

function explained(v, values) {
  const layer = v.layers.find((l) => l.key === "explanation");
  if (!layer || !values || values[0] === null || values[0] === undefined) return "";
  const variable = layer.categories[values[0]];
  const month = layer.windows[values[1]];
  return row("Weighed most", `${variable ? variable.name : values[0]}${month ? ` in ${month}` : ""}`);
}

function row(term, value) { return `<dt>${term}</dt><dd>${value}</dd>`; }

async function onClick(e) {
  state.lastClick = e.lngLat;
  if (!state.marker) state.marker = new maplibregl.Marker({ color: "#222" });
  state.marker.setLngLat(e.lngLat).addTo(map);
  const v = currentVersion();
  const [codes, confidences, why] = await Promise.all(
    ["class", "confidence", "explanation"].map((key) => readPoint(key, e.lngLat)));
  const code = codes && codes[0];
  const confidence = confidences && confidences[0];
  const info = $("info");
  if (code === null || code === undefined) {
    info.innerHTML = "No map at this place.";
    info.dataset.classValue = "";
    return;
  }
  const cls = v.classes.find((c) => c.value === code);
  const name = cls ? (cls.title || cls.name) : `code ${code}`;
  info.dataset.classValue = String(code);
  info.dataset.className = cls ? cls.name : "";
  info.innerHTML = "<dl>" +
    row("Class", `<span class="swatch" style="display:inline-block;background:${hexColor(cls && cls.color_hint)}"></span> ${name}`) +
    row("Confidence", confidence === null || confidence === undefined ? "–" : `${confidence} %`) +
    explained(v, why) + row("Model", v.model) + row("Version", v.version) +
    row("Lon, lat", `${e.lngLat.lng.toFixed(5)}, ${e.lngLat.lat.toFixed(5)}`) + "</dl>";
}

async function start() {
  const answer = await fetch(url("viewer.json"));
  state.config = await answer.json();
  const current = state.config.versions[0];
  state.version = current.version;
  state.layer = current.layers[0].key;
  $("title").textContent = state.config.title;
  document.title = `${state.config.title} – pivotmap`;
  renderVersions();
  const selectVersion = () => {
    const v = currentVersion();
    $("model").textContent = `Model ${v.model}; collection ${v.collection}`;
    if (!v.layers.some((l) => l.key === state.layer)) state.layer = v.layers[0].key;
    renderLayers();
    showLayer();
  };
  $("version").addEventListener("change", (e) => { state.version = e.target.value; selectVersion(); });
  $("opacity").addEventListener("input", (e) => {
    state.opacity = Number(e.target.value) / 100;
    $("opacity-value").textContent = `${e.target.value} %`;
    if (map.getLayer("map")) map.setPaintProperty("map", "raster-opacity", state.opacity);
  });
  map.on("click", onClick);
  map.on("error", (e) => {  // shown to the person, and kept in the console for tests
    $("status").textContent = `Could not load part of the map: ${e.error && e.error.message}`;
    console.error(e.error);
  });
  $("fit").addEventListener("click", () => map.fitBounds(boundsOf(currentVersion()), { padding: 20 }));
  map.on("moveend", renderDownload);
  map.fitBounds(boundsOf(current), { padding: 20, animate: false });
  await mapLoaded;
  selectVersion();
}

window.pivotmapViewer = { map, state };
start();
