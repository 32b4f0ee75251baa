/* cpnn view: CPNN predictions over a deep-zoom H&E, with OpenSeadragon.
 *
 * data.js defines window.CPNN_VIEW_DATA (written by cpnn.viewer): observation centres and
 * sizes in image pixels, and one entry per layer with its values (base64 float32) and
 * colour scale. Overlays are drawn on a canvas laid over OpenSeadragon's and redrawn on
 * every viewport change; tiles on a grid are drawn as one raster image (one pixel per tile),
 * spots as circles batched by colour. window.cpnnView exposes the state for tests.
 */
(function () {
  "use strict";
  var D = window.CPNN_VIEW_DATA;
  var state = { ready: false, layer: null, opacity: 0.7, shared: false, draws: 0, errors: [] };
  window.cpnnView = state;

  function decode(b64, Type) {
    var bin = atob(b64), bytes = new Uint8Array(bin.length);
    for (var i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    return new Type(bytes.buffer);
  }

  var n = D.n, xs = decode(D.x, Float32Array), ys = decode(D.y, Float32Array);
  var half = D.size / 2;
  var layers = {};
  D.layers.forEach(function (l) { layers[l.id] = l; });

  function valuesOf(layer) {
    if (!layer._values) layer._values = decode(layer.values, Float32Array);
    return layer._values;
  }

  function hex(r, g, b) {
    return "#" + [r, g, b].map(function (v) { return (v < 16 ? "0" : "") + v.toString(16); }).join("");
  }

  // colour index (0..255 for continuous layers, the category for categorical) of each observation
  function scaleOf(layer) {
    var top = layer.shareable && state.shared ? layer.vmax_shared : layer.vmax;
    return { lo: layer.vmin, hi: top };
  }

  function colourIndex(layer) {
    var v = valuesOf(layer), idx = new Int16Array(n);
    if (layer.kind === "categorical") {
      for (var i = 0; i < n; i++) idx[i] = v[i];
      return idx;
    }
    var s = scaleOf(layer), span = s.hi - s.lo;
    for (var j = 0; j < n; j++) {
      if (isNaN(v[j])) { idx[j] = -1; continue; }
      var t = (v[j] - s.lo) / span;
      idx[j] = Math.max(0, Math.min(255, Math.round(t * 255)));
    }
    return idx;
  }

  function palette(layer) {
    if (layer.kind === "categorical") return layer.colors;
    var lut = D.colormaps[layer.cmap], out = [];
    for (var i = 0; i < 256; i++) out.push(hex(lut[3 * i], lut[3 * i + 1], lut[3 * i + 2]));
    return out;
  }

  // ------------------------------------------------------------------ drawing
  var drawing = null;  // {raster: canvas} or {paths: [Path2D], colours: [...]}

  function prepare() {
    var layer = layers[state.layer], idx = colourIndex(layer), cols = palette(layer);
    if (D.raster) {
      var R = D.raster, c = document.createElement("canvas");
      c.width = R.width; c.height = R.height;
      var g = c.getContext("2d"), img = g.createImageData(R.width, R.height);
      var col = decode(R.col, Int32Array), row = decode(R.row, Int32Array);
      for (var i = 0; i < n; i++) {
        if (idx[i] < 0) continue;
        var h = cols[idx[i]], p = 4 * (row[i] * R.width + col[i]);
        img.data[p] = parseInt(h.substr(1, 2), 16);
        img.data[p + 1] = parseInt(h.substr(3, 2), 16);
        img.data[p + 2] = parseInt(h.substr(5, 2), 16);
        img.data[p + 3] = 255;
      }
      g.putImageData(img, 0, 0);
      drawing = { raster: c };
    } else {
      var paths = {}, keys = [];
      for (var j = 0; j < n; j++) {
        if (idx[j] < 0) continue;
        var k = idx[j];
        if (!paths[k]) { paths[k] = new Path2D(); keys.push(k); }
        if (D.shape === "circle") {
          paths[k].moveTo(xs[j] + half, ys[j]);
          paths[k].arc(xs[j], ys[j], half, 0, 2 * Math.PI);
        } else {
          paths[k].rect(xs[j] - half, ys[j] - half, D.size, D.size);
        }
      }
      drawing = { paths: keys.map(function (q) { return [cols[q], paths[q]]; }) };
    }
  }

  var viewer = OpenSeadragon({
    id: "osd",
    prefixUrl: "openseadragon/images/",
    tileSources: D.tiles,
    drawer: "canvas",
    showNavigator: true,
    navigatorPosition: "TOP_RIGHT",
    maxZoomPixelRatio: 4,
    visibilityRatio: 0.5,
    gestureSettingsMouse: { clickToZoom: false }
  });
  state.viewer = viewer;

  var overlay = document.createElement("canvas");
  overlay.className = "cpnn-overlay";
  viewer.canvas.appendChild(overlay);
  var ctx = overlay.getContext("2d");

  function imageToScreen() {
    var item = viewer.world.getItemAt(0);
    if (!item) return null;
    var a = item.imageToViewerElementCoordinates(new OpenSeadragon.Point(0, 0));
    var b = item.imageToViewerElementCoordinates(new OpenSeadragon.Point(1000, 0));
    return { x: a.x, y: a.y, s: (b.x - a.x) / 1000 };
  }

  function draw() {
    var el = viewer.canvas, dpr = window.devicePixelRatio || 1;
    var w = Math.round(el.clientWidth * dpr), h = Math.round(el.clientHeight * dpr);
    if (overlay.width !== w || overlay.height !== h) {
      overlay.width = w; overlay.height = h;
      overlay.style.width = el.clientWidth + "px"; overlay.style.height = el.clientHeight + "px";
    }
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.clearRect(0, 0, w, h);
    var t = imageToScreen();
    if (!t || !drawing) return;
    ctx.setTransform(dpr * t.s, 0, 0, dpr * t.s, dpr * t.x, dpr * t.y);
    if (drawing.raster) {
      var R = D.raster;
      ctx.imageSmoothingEnabled = false;
      ctx.drawImage(drawing.raster, R.x0, R.y0, R.width * R.cell, R.height * R.cell);
    } else {
      drawing.paths.forEach(function (cp) { ctx.fillStyle = cp[0]; ctx.fill(cp[1]); });
    }
    state.draws += 1;
    scaleBar(t.s);
  }

  function scaleBar(s) {
    var box = document.getElementById("scalebar");
    if (!D.mpp) { box.style.display = "none"; return; }
    var umPerScreenPx = D.mpp / s, target = 120 * umPerScreenPx;
    var e = Math.pow(10, Math.floor(Math.log10(target))), um = e;
    [1, 2, 5].forEach(function (m) { if (m * e <= target) um = m * e; });
    document.getElementById("scalebar-bar").style.width = Math.round(um / umPerScreenPx) + "px";
    document.getElementById("scalebar-label").textContent = um >= 1000 ? (um / 1000) + " mm" : um + " µm";
    box.style.display = "block";
  }

  viewer.addHandler("update-viewport", draw);
  viewer.addHandler("resize", draw);
  viewer.addHandler("open", function () {
    var item = viewer.world.getItemAt(0);
    function done() { state.ready = true; draw(); }
    if (item.getFullyLoaded()) done();
    item.addHandler("fully-loaded-change", function (e) { if (e.fullyLoaded) done(); });
  });
  viewer.addHandler("open-failed", function (e) { state.errors.push("open-failed: " + e.message); });

  // ------------------------------------------------------------------ controls
  var select = document.getElementById("layer");
  var groups = {};
  D.layers.forEach(function (l) {
    if (!groups[l.group]) {
      groups[l.group] = document.createElement("optgroup");
      groups[l.group].label = l.group;
      select.appendChild(groups[l.group]);
    }
    var o = document.createElement("option");
    o.value = l.id; o.textContent = l.label;
    groups[l.group].appendChild(o);
  });

  function legend() {
    var layer = layers[state.layer], box = document.getElementById("legend");
    box.innerHTML = "";
    var title = document.createElement("div");
    title.className = "legend-title";
    title.textContent = layer.label;
    box.appendChild(title);
    if (layer.kind === "categorical") {
      layer.names.forEach(function (name, i) {
        if (!layer.counts[i]) return;
        var row = document.createElement("div"), sw = document.createElement("span");
        row.className = "category"; sw.className = "swatch"; sw.style.background = layer.colors[i];
        row.appendChild(sw);
        row.appendChild(document.createTextNode(name + " (" + layer.counts[i] + ")"));
        box.appendChild(row);
      });
    } else {
      var c = document.createElement("canvas"), lut = D.colormaps[layer.cmap];
      c.width = 256; c.height = 1;
      var g = c.getContext("2d"), img = g.createImageData(256, 1);
      for (var i = 0; i < 256; i++) {
        img.data[4 * i] = lut[3 * i]; img.data[4 * i + 1] = lut[3 * i + 1];
        img.data[4 * i + 2] = lut[3 * i + 2]; img.data[4 * i + 3] = 255;
      }
      g.putImageData(img, 0, 0);
      box.appendChild(c);
      var s = scaleOf(layer), ticks = document.createElement("div");
      ticks.className = "legend-ticks";
      [s.lo, (s.lo + s.hi) / 2, s.hi].forEach(function (v) {
        var t = document.createElement("span"); t.textContent = fmt(v); ticks.appendChild(t);
      });
      box.appendChild(ticks);
      var unit = document.createElement("div");
      unit.className = "legend-note";
      unit.textContent = layer.unit + "; " + (layer.shareable && state.shared ? layer.note_shared : layer.note);
      box.appendChild(unit);
    }
    var other = document.createElement("div");
    other.className = "legend-note";
    other.textContent = D.shape === "circle" ? "Spots drawn at their measured diameter." : "Tiles drawn at their size.";
    box.appendChild(other);
  }

  function fmt(v) {
    if (v === null || v === undefined || isNaN(v)) return "n/a";
    var a = Math.abs(v);
    return a !== 0 && (a < 0.01 || a >= 1e4) ? v.toExponential(2) : v.toFixed(a < 1 ? 3 : 2);
  }

  function setLayer(id) {
    if (!layers[id]) throw new Error("no layer " + id);
    state.layer = id;
    select.value = id;
    document.getElementById("shared-row").style.display = layers[id].shareable ? "block" : "none";
    prepare(); legend(); draw();
  }
  state.setLayer = setLayer;
  state.layerIds = D.layers.map(function (l) { return l.id; });

  function setOpacity(v) {
    state.opacity = +v;
    overlay.style.opacity = state.opacity;
    document.getElementById("opacity").value = v;
    document.getElementById("opacity-value").textContent = Math.round(100 * v) + " %";
  }
  state.setOpacity = setOpacity;

  select.addEventListener("change", function () { setLayer(select.value); });
  document.getElementById("opacity").addEventListener("input", function (e) { setOpacity(e.target.value); });
  document.getElementById("shared").addEventListener("change", function (e) {
    state.shared = e.target.checked; prepare(); legend(); draw();
  });

  // ------------------------------------------------------------------ value under the cursor
  var cell = D.size, buckets = {};
  for (var i = 0; i < n; i++) {
    var key = Math.floor(xs[i] / cell) + "," + Math.floor(ys[i] / cell);
    (buckets[key] = buckets[key] || []).push(i);
  }

  function hit(x, y) {
    var cx = Math.floor(x / cell), cy = Math.floor(y / cell), best = -1, bestD = Infinity;
    for (var dx = -1; dx <= 1; dx++) {
      for (var dy = -1; dy <= 1; dy++) {
        (buckets[(cx + dx) + "," + (cy + dy)] || []).forEach(function (j) {
          var ex = x - xs[j], ey = y - ys[j];
          var inside = D.shape === "circle" ? ex * ex + ey * ey <= half * half
                                            : Math.abs(ex) <= half && Math.abs(ey) <= half;
          var d = ex * ex + ey * ey;
          if (inside && d < bestD) { best = j; bestD = d; }
        });
      }
    }
    return best;
  }
  state.hit = hit;

  function describe(j) {
    var layer = layers[state.layer], dom = layers.dominant, name = dom.names[valuesOf(dom)[j]];
    var weight = layers["weight:" + name];
    var lines = [D.ids ? D.ids[j] : D.level + " " + j];
    if (layer.kind !== "categorical") {
      lines.push(layer.label.split(" (")[0] + ": " + fmt(valuesOf(layer)[j]) + " " + layer.unit);
    }
    lines.push("dominant type: " + name + (weight ? " (weight " + fmt(valuesOf(weight)[j]) + ")" : ""));
    return lines.join("\n");
  }
  state.describe = describe;

  new OpenSeadragon.MouseTracker({
    element: viewer.canvas,
    moveHandler: function (e) {
      var item = viewer.world.getItemAt(0), out = document.getElementById("readout");
      if (!item) return;
      var p = item.viewerElementToImageCoordinates(e.position), j = hit(p.x, p.y);
      out.textContent = j < 0 ? "x " + Math.round(p.x) + ", y " + Math.round(p.y) + " px: no " + D.level : describe(j);
      out.style.whiteSpace = "pre-line";
    },
    leaveHandler: function () { document.getElementById("readout").textContent = "Move the cursor over a spot or tile."; }
  });

  document.getElementById("subtitle").textContent = D.subtitle || "";
  document.getElementById("about").textContent = D.about || "";
  setOpacity(state.opacity);
  setLayer(D.layers[D.default_layer || 0].id);
})();
