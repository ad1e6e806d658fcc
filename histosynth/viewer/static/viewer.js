// histosynth's slide viewer: Deep Zoom tiles as <img> elements, panned by drag and zoomed by wheel, buttons or keys.
// The slide's description comes from config.js (window.HISTOSYNTH_VIEWER), so the page works from a server and
// from file:// alike. <img> tiles rather than a canvas: file:// images would taint a canvas, and the browser
// already caches, decodes and composites images well.
(function () {
  "use strict";

  const config = window.HISTOSYNTH_VIEWER;
  const viewer = document.getElementById("viewer");
  const $ = (id) => document.getElementById(id);
  if (!config) {
    $("message").textContent = "config.js is missing: open the page that histosynth view or --export wrote.";
    $("message").hidden = false;
    return;
  }

  const MAX_ZOOM = 8; // screen px per slide px: a little past full resolution, to look at single nuclei
  const STEP = 2; // zoom factor of one button press or key press

  // One Deep Zoom image drawn over the whole slide (the slide itself, or its mask, which may differ in size).
  class Layer {
    constructor(spec, name, slideWidth) {
      this.spec = spec;
      this.top = Math.ceil(Math.log2(Math.max(spec.width, spec.height, 1)));
      this.slidePxPerLayerPx = slideWidth / spec.width;
      this.visible = true;
      this.tiles = new Map(); // "level/col_row" -> <img>
      this.el = document.createElement("div");
      this.el.className = "layer " + name;
      viewer.insertBefore(this.el, $("scalebar"));
      // The coarsest level worth drawing: the largest one that still fits in a single tile; always underneath,
      // so a view is never empty while its sharp tiles load.
      this.base = 0;
      for (let level = 0; level <= this.top; level++) {
        const [w, h] = this.levelSize(level);
        if (Math.max(w, h) <= spec.tileSize) this.base = level;
      }
    }

    levelSize(level) {
      const f = 2 ** (this.top - level);
      return [Math.ceil(this.spec.width / f), Math.ceil(this.spec.height / f)];
    }

    // The level whose pixels are at least as fine as the screen's device pixels at this zoom.
    levelFor(zoom) {
      const wanted = this.top + Math.log2(zoom * this.slidePxPerLayerPx * (window.devicePixelRatio || 1));
      return Math.max(this.base, Math.min(this.top, Math.ceil(wanted - 0.1)));
    }

    render(view, width, height) {
      const wanted = new Set();
      if (this.visible) {
        const level = this.levelFor(view.zoom);
        const levels = [this.base];
        if (level - 1 > this.base) levels.push(level - 1);
        if (level > this.base) levels.push(level);
        for (const l of levels) this.renderLevel(l, view, width, height, wanted);
      }
      for (const [key, img] of this.tiles) {
        if (!wanted.has(key)) {
          img.remove();
          this.tiles.delete(key);
        }
      }
    }

    renderLevel(level, view, width, height, wanted) {
      const { tileSize: ts, overlap } = this.spec;
      const [levelW, levelH] = this.levelSize(level);
      const slidePerLevelPx = this.slidePxPerLayerPx * 2 ** (this.top - level);
      const left = view.x - width / 2 / view.zoom; // slide px at the viewport's left edge
      const top = view.y - height / 2 / view.zoom;
      const col0 = Math.max(0, Math.floor(left / slidePerLevelPx / ts));
      const row0 = Math.max(0, Math.floor(top / slidePerLevelPx / ts));
      const col1 = Math.min(Math.ceil(levelW / ts) - 1, Math.floor((left + width / view.zoom) / slidePerLevelPx / ts));
      const row1 = Math.min(Math.ceil(levelH / ts) - 1, Math.floor((top + height / view.zoom) / slidePerLevelPx / ts));
      const scale = slidePerLevelPx * view.zoom; // screen px per level px
      for (let row = row0; row <= row1; row++) {
        for (let col = col0; col <= col1; col++) {
          const key = level + "/" + col + "_" + row;
          wanted.add(key);
          let img = this.tiles.get(key);
          if (!img) {
            img = document.createElement("img");
            img.alt = "";
            img.draggable = false;
            img.style.zIndex = String(level);
            img.onerror = () => img.classList.add("failed");
            img.src = this.spec.url + key + "." + this.spec.format;
            this.tiles.set(key, img);
            this.el.appendChild(img);
          }
          // A tile carries `overlap` extra px on each side that has a neighbour, which hides sub-pixel seams.
          const x0 = col * ts - (col > 0 ? overlap : 0);
          const y0 = row * ts - (row > 0 ? overlap : 0);
          const x1 = Math.min((col + 1) * ts + overlap, levelW);
          const y1 = Math.min((row + 1) * ts + overlap, levelH);
          img.style.left = (x0 * slidePerLevelPx - left) * view.zoom + "px";
          img.style.top = (y0 * slidePerLevelPx - top) * view.zoom + "px";
          img.style.width = (x1 - x0) * scale + "px";
          img.style.height = (y1 - y0) * scale + "px";
        }
      }
    }

    pending() {
      let n = 0;
      for (const img of this.tiles.values()) if (!img.complete) n++;
      return n;
    }
  }

  const slide = new Layer(config.slide, "slide", config.slide.width);
  const overlay = config.mask ? new Layer(config.mask, "mask", config.slide.width) : null;
  const layers = overlay ? [slide, overlay] : [slide];
  const view = { x: config.slide.width / 2, y: config.slide.height / 2, zoom: 1 };
  let fitZoom = 1;
  let scheduled = false;

  function size() {
    return [viewer.clientWidth, viewer.clientHeight];
  }

  function fit() {
    const [w, h] = size();
    fitZoom = Math.min(w / config.slide.width, h / config.slide.height) * 0.95;
    view.x = config.slide.width / 2;
    view.y = config.slide.height / 2;
    view.zoom = fitZoom;
    update();
  }

  function update() {
    if (scheduled) return;
    scheduled = true;
    requestAnimationFrame(() => {
      scheduled = false;
      render();
    });
  }

  function render() {
    const [w, h] = size();
    // Keep the view's centre on the slide, so it cannot be lost off-screen.
    view.x = Math.max(0, Math.min(config.slide.width, view.x));
    view.y = Math.max(0, Math.min(config.slide.height, view.y));
    for (const layer of layers) layer.render(view, w, h);
    renderInfo(w);
  }

  function zoomAt(factor, sx, sy) {
    const [w, h] = size();
    if (sx === undefined) [sx, sy] = [w / 2, h / 2];
    const zoom = Math.max(fitZoom / 4, Math.min(MAX_ZOOM, view.zoom * factor));
    // The slide point under (sx, sy) stays under it.
    const px = view.x + (sx - w / 2) / view.zoom;
    const py = view.y + (sy - h / 2) / view.zoom;
    view.zoom = zoom;
    view.x = px - (sx - w / 2) / zoom;
    view.y = py - (sy - h / 2) / zoom;
    update();
  }

  function panBy(dx, dy) {
    view.x -= dx / view.zoom;
    view.y -= dy / view.zoom;
    update();
  }

  function setOverlay(on) {
    if (!overlay) return;
    overlay.visible = on;
    overlay.el.hidden = !on;
    $("overlay-toggle").checked = on;
    update();
  }

  function renderInfo(width) {
    const level = slide.levelFor(view.zoom);
    $("info").textContent = config.slide.width + " × " + config.slide.height + " px · " +
      (view.zoom >= 0.1 ? view.zoom.toFixed(2) : view.zoom.toPrecision(2)) + "× · level " + level + "/" + slide.top;
    if (!config.mpp) return;
    // Scale bar: the round length (1, 2 or 5 × 10^k µm) closest below 120 screen px.
    const umPerScreenPx = config.mpp / view.zoom;
    const target = Math.min(120, width / 3) * umPerScreenPx;
    const magnitude = 10 ** Math.floor(Math.log10(target));
    const um = [5, 2, 1].map((m) => m * magnitude).find((v) => v <= target) || magnitude;
    $("scalebar-bar").style.width = um / umPerScreenPx + "px";
    $("scalebar-label").textContent = um >= 1000 ? um / 1000 + " mm" : (um >= 1 ? um : um.toPrecision(1)) + " µm";
    $("scalebar").hidden = false;
  }

  // --- input -------------------------------------------------------------------------------------------------
  let drag = null;
  viewer.addEventListener("pointerdown", (e) => {
    if (e.button !== 0) return;
    drag = { x: e.clientX, y: e.clientY };
    viewer.setPointerCapture(e.pointerId);
    viewer.classList.add("dragging");
    viewer.focus();
  });
  viewer.addEventListener("pointermove", (e) => {
    if (!drag) return;
    panBy(e.clientX - drag.x, e.clientY - drag.y);
    drag = { x: e.clientX, y: e.clientY };
  });
  const endDrag = () => {
    drag = null;
    viewer.classList.remove("dragging");
  };
  viewer.addEventListener("pointerup", endDrag);
  viewer.addEventListener("pointercancel", endDrag);
  viewer.addEventListener("wheel", (e) => {
    e.preventDefault();
    const rect = viewer.getBoundingClientRect();
    const perUnit = e.deltaMode === 1 ? 0.05 : e.deltaMode === 2 ? 1 : 0.002; // lines, pages, pixels
    zoomAt(Math.exp(-e.deltaY * perUnit), e.clientX - rect.left, e.clientY - rect.top);
  }, { passive: false });
  viewer.addEventListener("dblclick", (e) => {
    const rect = viewer.getBoundingClientRect();
    zoomAt(e.shiftKey ? 1 / STEP : STEP, e.clientX - rect.left, e.clientY - rect.top);
  });
  document.addEventListener("keydown", (e) => {
    if (e.ctrlKey || e.metaKey || e.altKey) return; // leave the browser's own shortcuts alone
    if (e.target instanceof HTMLInputElement && e.target.type === "range") return; // its arrows move the slider
    const [w, h] = size();
    const actions = {
      "+": () => zoomAt(STEP), "=": () => zoomAt(STEP), "-": () => zoomAt(1 / STEP), "_": () => zoomAt(1 / STEP),
      "0": fit, "Home": fit,
      "ArrowLeft": () => panBy(w / 5, 0), "ArrowRight": () => panBy(-w / 5, 0),
      "ArrowUp": () => panBy(0, h / 5), "ArrowDown": () => panBy(0, -h / 5),
      "m": () => setOverlay(overlay ? !overlay.visible : false),
    };
    const action = actions[e.key];
    if (action) {
      e.preventDefault();
      action();
    }
  });
  $("zoom-in").addEventListener("click", () => zoomAt(STEP));
  $("zoom-out").addEventListener("click", () => zoomAt(1 / STEP));
  $("zoom-fit").addEventListener("click", fit);
  window.addEventListener("resize", () => {
    const [w, h] = size();
    fitZoom = Math.min(w / config.slide.width, h / config.slide.height) * 0.95;
    update();
  });

  // --- page ----------------------------------------------------------------------------------------------------
  document.title = config.name + " · histosynth viewer";
  $("title").textContent = config.name;
  if (overlay) {
    $("overlay-controls").hidden = false;
    $("overlay-toggle").addEventListener("change", (e) => setOverlay(e.target.checked));
    const opacity = $("overlay-opacity");
    const applyOpacity = () => { overlay.el.style.opacity = String(opacity.value / 100); };
    opacity.addEventListener("input", applyOpacity);
    applyOpacity();
    for (const c of config.mask.classes || []) {
      const item = document.createElement("span");
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = c.color;
      item.append(swatch, c.name);
      $("legend").appendChild(item);
    }
  }

  // For scripts and tests: the view, its controls, and whether every wanted tile has arrived.
  window.histosynthViewer = {
    view, zoomAt, panBy, fit, setOverlay,
    level: () => slide.levelFor(view.zoom),
    tiles: () => layers.reduce((n, layer) => n + layer.tiles.size, 0),
    pending: () => layers.reduce((n, layer) => n + layer.pending(), 0) + (scheduled ? 1 : 0),
    overlayShown: () => Boolean(overlay && overlay.visible),
  };
  fit();
  viewer.focus();
})();
