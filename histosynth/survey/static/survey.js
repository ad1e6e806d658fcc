// Reader page: shows the current item, zoom/pan, answers with mouse or keyboard, resumes from the server's state.
"use strict";

(function () {
  const base = document.body.dataset.base;  // /r/TOKEN
  const $ = (id) => document.getElementById(id);
  const tile = $("tile"), viewer = $("viewer"), comment = $("comment"), message = $("message");
  let current = null;      // the item id on screen
  let choice = null;       // "real" | "synthetic"
  let confidence = null;   // 1..5
  let busy = false;        // a request is in flight: ignore further submits
  const view = { scale: 1, x: 0, y: 0 };
  // The reader chose a zoom for this item: an image that finishes loading afterwards (or a resized window) keeps
  // that zoom, centred, instead of snapping back to fit.
  let zoomChosen = false;

  // ---- zoom and pan ------------------------------------------------------------------------------------------
  function fitScale() {
    if (!tile.naturalWidth) return 1;
    return Math.min(viewer.clientWidth / tile.naturalWidth, viewer.clientHeight / tile.naturalHeight);
  }
  // Full resolution means one image pixel per device pixel, whatever the screen's pixel ratio.
  const fullScale = () => 1 / (window.devicePixelRatio || 1);

  function applyView() {
    tile.style.transform = `translate(${view.x}px, ${view.y}px) scale(${view.scale})`;
    // Past 1:1, show pixels as blocks instead of smoothing them away: artefacts are what readers look for.
    tile.classList.toggle("pixelated", view.scale > fullScale() * 1.01);
    $("zoom-level").textContent = `${Math.round(view.scale / fullScale() * 100)} %`;
  }

  function setScale(scale, cx, cy) {
    const lo = Math.min(fitScale(), fullScale()) / 2, hi = 32 * fullScale();
    scale = Math.max(lo, Math.min(hi, scale));
    if (cx === undefined) { cx = viewer.clientWidth / 2; cy = viewer.clientHeight / 2; }
    // Keep the image point under (cx, cy) where it is.
    view.x = cx - (cx - view.x) * scale / view.scale;
    view.y = cy - (cy - view.y) * scale / view.scale;
    view.scale = scale;
    zoomChosen = true;
    applyView();
  }

  function centreAt(scale) {
    view.scale = scale;
    view.x = (viewer.clientWidth - tile.naturalWidth * scale) / 2;
    view.y = (viewer.clientHeight - tile.naturalHeight * scale) / 2;
    applyView();
  }

  function fit() {
    zoomChosen = false;
    centreAt(fitScale());
  }
  const recentre = () => centreAt(zoomChosen ? view.scale : fitScale());
  tile.addEventListener("load", recentre);
  window.addEventListener("resize", recentre);
  viewer.addEventListener("wheel", (event) => {
    event.preventDefault();
    const rect = viewer.getBoundingClientRect();
    setScale(view.scale * Math.pow(1.2, -event.deltaY / 100), event.clientX - rect.left, event.clientY - rect.top);
  }, { passive: false });

  let drag = null;
  viewer.addEventListener("pointerdown", (event) => {
    drag = { x: event.clientX - view.x, y: event.clientY - view.y };
    viewer.setPointerCapture(event.pointerId);
    viewer.classList.add("dragging");
  });
  viewer.addEventListener("pointermove", (event) => {
    if (!drag) return;
    view.x = event.clientX - drag.x;
    view.y = event.clientY - drag.y;
    applyView();
  });
  const endDrag = () => { drag = null; viewer.classList.remove("dragging"); };
  viewer.addEventListener("pointerup", endDrag);
  viewer.addEventListener("pointercancel", endDrag);

  $("zoom-in").addEventListener("click", () => setScale(view.scale * 1.5));
  $("zoom-out").addEventListener("click", () => setScale(view.scale / 1.5));
  $("zoom-fit").addEventListener("click", fit);
  $("zoom-full").addEventListener("click", () => setScale(fullScale()));

  // ---- answering -----------------------------------------------------------------------------------------------
  function setChoice(value) {
    choice = value;
    document.querySelectorAll("button.answer").forEach((b) => b.classList.toggle("selected", b.dataset.answer === value));
    message.textContent = "";
  }

  function setConfidence(value) {
    confidence = value;
    document.querySelectorAll("button.conf").forEach(
      (b) => b.classList.toggle("selected", Number(b.dataset.confidence) === value));
    message.textContent = "";
  }

  function show(state) {
    const bar = $("progress");
    $("progress-fill").style.width = `${state.total ? 100 * state.done / state.total : 100}%`;
    bar.setAttribute("aria-valuemax", state.total);
    bar.setAttribute("aria-valuenow", state.done);
    if (state.item === null) {
      $("position").textContent = `${state.done} / ${state.total} done`;
      $("study").hidden = true;
      $("done").hidden = false;
      current = null;
      return;
    }
    $("position").textContent = `${state.position} / ${state.total}`;
    if (state.item !== current) {
      current = state.item;
      setChoice(null);
      setConfidence(null);
      comment.value = "";
      comment.blur();  // the shortcuts belong to the new item, not to the comment field
      zoomChosen = false;
      tile.src = `${base}/items/${state.item}.png`;
    }
  }

  async function loadState() {
    const response = await fetch(`${base}/state`, { cache: "no-store" });
    if (!response.ok) { message.textContent = `Could not load the study (${response.status}).`; return; }
    show(await response.json());
  }

  async function submit() {
    if (busy || current === null) return;
    if (!choice || !confidence) {
      message.textContent = "Choose real or synthetic (R / S) and a confidence (1–5) first.";
      return;
    }
    busy = true;
    try {
      const response = await fetch(`${base}/answer`, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ item: current, answer: choice, confidence: confidence, comment: comment.value }),
      });
      const body = await response.json().catch(() => ({}));
      if (response.ok) show(body);
      else if (response.status === 409 && body.state) show(body.state);  // another tab moved on: follow it
      else message.textContent = body.error || `Could not save the answer (${response.status}).`;
    } catch (error) {
      message.textContent = "Could not reach the server; your answer was not saved. Try again.";
    } finally {
      busy = false;
    }
  }

  document.querySelectorAll("button.answer").forEach((b) => b.addEventListener("click", () => setChoice(b.dataset.answer)));
  document.querySelectorAll("button.conf").forEach(
    (b) => b.addEventListener("click", () => setConfidence(Number(b.dataset.confidence))));
  $("submit").addEventListener("click", submit);

  document.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey) return;  // leave Ctrl+R (reload) and friends alone
    if (event.target === comment) {
      if (event.key === "Enter") { event.preventDefault(); submit(); }
      else if (event.key === "Escape") comment.blur();
      return;
    }
    const key = event.key;
    let handled = true;
    if (key === "r" || key === "R") setChoice("real");
    else if (key === "s" || key === "S") setChoice("synthetic");
    else if (key >= "1" && key <= "5" && key.length === 1) setConfidence(Number(key));
    else if (key === "Enter") submit();
    else if (key === "c" || key === "C") comment.focus();
    else if (key === "+" || key === "=") setScale(view.scale * 1.5);
    else if (key === "-" || key === "_") setScale(view.scale / 1.5);
    else if (key === "f" || key === "F") fit();
    else if (key === "z" || key === "Z") setScale(fullScale());
    else handled = false;
    if (handled) event.preventDefault();  // Enter on a focused button must not click it a second time
  });

  loadState();
})();
