// chestxray viewer: upload one radiograph, read it (window/level, zoom, pan, Grad-CAM
// opacity, side by side) and take the results away. Vanilla JS, no third-party code; talks
// only to this server's /api/v1. Pixel work is in pixels.js.
"use strict";

(() => {
  const P = window.ChestxrayPixels;
  const $ = (id) => document.getElementById(id);
  const els = {
    file: $("file"), drop: $("drop"), status: $("status"), error: $("error"), result: $("result"),
    view: $("view"), plain: $("view-plain"), stage: $("stage"), imageWarnings: $("image-warnings"),
    caption: $("caption"), legend: $("legend"), legendScale: $("legend-scale"), readout: $("readout"),
    findings: $("findings"), summary: $("summary"), forget: $("forget"), camHint: $("cam-hint"),
    facts: $("model-facts"), warnings: $("warnings"), policy: $("policy"),
    wc: $("wc"), ww: $("ww"), invert: $("invert"), opacity: $("opacity"), opacityValue: $("opacity-value"),
    side: $("side"), zoomLevel: $("zoom-level"), modeWl: $("mode-wl"), modePan: $("mode-pan"),
    help: $("help"), helpToggle: $("help-toggle"), helpKeys: $("help-keys"),
    dlJson: $("dl-json"), dlReport: $("dl-report"), dlSr: $("dl-sr"),
  };
  const pct = (p) => `${(100 * p).toFixed(1)}%`;

  let current = null;   // the analysis response
  let display = null;   // its /display answer
  let image = null;     // {width, height, values}
  let quantile = null;  // q -> stored value
  let active = null;    // finding whose heat map is shown
  let heats = new Map();  // finding -> {rgba, alpha, caption}
  let busy = false;
  const state = { centre: 0, width: 1, invert: false, opacity: 1, zoom: 1, cx: 0, cy: 0, pan: false, side: false };
  let initialWindow = [0, 1];
  let lastOpacity = 1;
  let lut = new Uint8Array(65536);
  let buffers = null;   // offscreen canvases at image size: composite and plain
  let dirty = true;     // the composite needs recomputing (not just redrawing)

  function say(text) { els.status.textContent = text; }
  function fail(text) { els.error.textContent = text; els.error.hidden = !text; }

  async function errorText(resp) {
    try {
      const body = await resp.json();
      if (typeof body.detail === "string") return body.detail;
    } catch (_) { /* not JSON */ }
    return `${resp.status} ${resp.statusText}`;
  }

  // -- upload -----------------------------------------------------------------------------

  async function forgetCurrent() {
    if (!current) return;
    const id = current.id;
    current = null;
    try { await fetch(`/api/v1/analyses/${encodeURIComponent(id)}`, { method: "DELETE" }); } catch (_) { /* gone */ }
  }

  function resetHeat() {
    heats = new Map();
    active = null;
    delete els.view.dataset.heat;
    els.legend.hidden = true;
    els.caption.textContent = "Radiograph as analysed by the server.";
  }

  async function clearResult() {
    await forgetCurrent();
    resetHeat();
    image = display = buffers = null;
    els.result.hidden = true;
    els.findings.replaceChildren();
    els.summary.textContent = "";
    for (const c of [els.view, els.plain]) {  // no pixel of the previous image may stay behind
      const ctx = c.getContext("2d");
      ctx.setTransform(1, 0, 0, 1, 0, 0);
      ctx.clearRect(0, 0, c.width, c.height);
      delete c.dataset.view;
    }
  }

  async function analyse(file, study = null) {
    if (!file || busy) return;
    openStudy = study;
    $("send-pacs").hidden = !study;
    busy = true;
    fail("");
    say("Analysing the image…");
    els.drop.classList.add("working");
    const form = new FormData();
    form.append("file", file, "upload");  // the server never sees the real file name
    try {
      const resp = await fetch("/api/v1/analyses", { method: "POST", body: form });
      if (!resp.ok) {
        const reason = await errorText(resp);
        await clearResult();
        say("");
        fail(`The image could not be analysed: ${reason}`);
        return;
      }
      const analysis = await resp.json();
      await forgetCurrent();
      resetHeat();
      current = analysis;
      await loadPixels(analysis);
      renderFindings(analysis);
      els.result.hidden = false;
      fitView();
      say(`Analysis done (${display.source}).`);
    } catch (err) {
      await clearResult();
      say("");
      fail(`The image could not be shown (${err.message}).`);
    } finally {
      busy = false;
      els.drop.classList.remove("working");
      els.file.value = "";
    }
  }

  async function loadPixels(analysis) {
    const base = `/api/v1/analyses/${encodeURIComponent(analysis.id)}`;
    const info = await fetch(`${base}/display`);
    if (!info.ok) throw new Error(await errorText(info));
    display = await info.json();
    const px = await fetch(display.pixels_url);
    if (!px.ok) throw new Error(await errorText(px));
    image = await P.decodePng16(await px.arrayBuffer());
    quantile = P.histogram(image.values);
    const make = () => { const c = document.createElement("canvas"); c.width = image.width; c.height = image.height; return c; };
    buffers = { overlay: make(), plain: make() };
    const dw = display.dicom_window;
    // A DICOM starts at its own window, an 8-bit image as it is (0..255), anything else at full range.
    initialWindow = dw ? [dw.center, dw.width] : display.source === "8-bit image" ? [128, 256] : presetWindow("full");
    document.querySelector('[data-preset="dicom"]').disabled = !dw;
    els.dlJson.href = display.result_url;
    // DICOM inputs only, and only where the server can build SRs (the pacs extra).
    if (display.sr_url) els.dlSr.href = display.sr_url; else els.dlSr.removeAttribute("href");
    els.dlSr.hidden = !display.sr_url;
    setWindow(...initialWindow);
  }

  // -- window / level ---------------------------------------------------------------------

  const toValue = (s) => display.value_offset + display.value_slope * s;  // stored -> image units
  const round4 = (v) => Number(v.toPrecision(6));

  function presetWindow(name) {
    const range = (lo, hi) => [(lo + hi + 1) / 2, Math.max(2, hi - lo + 1)];
    const q = quantile;
    switch (name) {
      case "lung": return range(q(0.02), q(0.7));
      case "mediastinum": return range(q(0.45), q(0.99));
      case "bone": return range(q(0.7), q(1));
      case "dicom": return display.dicom_window ? [display.dicom_window.center, display.dicom_window.width] : null;
      default: return range(display.stored_min, display.stored_max);
    }
  }

  function setWindow(centre, width) {
    state.centre = centre;
    state.width = Math.max(1, width);
    els.wc.value = round4(toValue(state.centre));
    els.ww.value = round4(state.width * display.value_slope);
    changed();
  }

  function changed() {
    lut = P.buildLut(state.centre, state.width, state.invert, lut);
    els.view.dataset.window = JSON.stringify({ centre: state.centre, width: state.width, invert: state.invert });
    dirty = true;
    schedule();
  }

  // -- heat maps --------------------------------------------------------------------------

  async function fetchHeat(name) {
    const resp = await fetch(`${display.heat_url}?finding=${encodeURIComponent(name)}`);
    if (!resp.ok) throw new Error(await errorText(resp));
    const alpha = Number(resp.headers.get("X-Grad-CAM-Alpha") || "0");
    const caption = resp.headers.get("X-Grad-CAM-Caption") || `Grad-CAM for ${name}.`;
    const bitmap = await createImageBitmap(await resp.blob(), { colorSpaceConversion: "none", premultiplyAlpha: "none" });
    const c = document.createElement("canvas");
    c.width = bitmap.width; c.height = bitmap.height;
    const ctx = c.getContext("2d");
    ctx.drawImage(bitmap, 0, 0);
    return { rgba: ctx.getImageData(0, 0, c.width, c.height).data, alpha, caption };
  }

  async function toggleCam(finding, button) {
    if (!current) return;
    const name = finding.finding;
    for (const b of els.findings.querySelectorAll(".cam-toggle")) if (b !== button) b.setAttribute("aria-pressed", "false");
    if (active === name) {
      active = null;
      delete els.view.dataset.heat;
      button.setAttribute("aria-pressed", "false");
      els.legend.hidden = true;
      els.caption.textContent = "Radiograph as analysed by the server.";
      say(`Grad-CAM for ${name} hidden.`);
      dirty = true; schedule();
      return;
    }
    active = name;
    button.setAttribute("aria-pressed", "true");
    const analysisId = current.id;
    let heat = heats.get(name);
    if (!heat) {
      say(`Computing Grad-CAM for ${name}…`);
      button.classList.add("working");
      try {
        heat = await fetchHeat(name);
      } catch (err) {
        if (active === name) { active = null; button.setAttribute("aria-pressed", "false"); }
        fail(`Grad-CAM for ${name} failed: ${err.message}`);
        say("");
        return;
      } finally {
        button.classList.remove("working");
      }
      if (!current || current.id !== analysisId) return;
      heats.set(name, heat);
    }
    if (active !== name) return;  // another toggle was pressed meanwhile
    fail("");
    if (!els.legendScale.getAttribute("src")) els.legendScale.src = "/static/cam-legend.png";
    els.legend.hidden = heat.alpha === 0;  // an empty map has nothing to read off the scale
    els.caption.textContent = heat.caption;
    els.view.dataset.heat = name;
    say(`Grad-CAM for ${name} shown.`);
    dirty = true; schedule();
  }

  // -- drawing ----------------------------------------------------------------------------

  let frame = 0;
  function schedule() { if (!frame) frame = requestAnimationFrame(() => { frame = 0; draw(); }); }

  function recompose() {
    const heat = active ? heats.get(active) : null;
    const a = heat ? state.opacity * heat.alpha : 0;
    for (const [key, withHeat] of [["overlay", true], ["plain", false]]) {
      if (key === "plain" && !state.side) continue;
      const ctx = buffers[key].getContext("2d");
      const out = ctx.createImageData(image.width, image.height);
      P.compose(image, lut, withHeat && heat ? heat.rgba : null, a, out);
      ctx.putImageData(out, 0, 0);
    }
    dirty = false;
  }

  function sizeCanvas(canvas) {
    const dpr = window.devicePixelRatio || 1;
    const rect = canvas.getBoundingClientRect();
    const w = Math.max(1, Math.round(rect.width * dpr)), h = Math.max(1, Math.round(rect.height * dpr));
    if (canvas.width !== w || canvas.height !== h) { canvas.width = w; canvas.height = h; }
    return dpr;
  }

  // The view: `zoom` screen (CSS) pixels per image pixel, image point (cx, cy) at each canvas' centre.
  function transformFor(canvas, dpr) {
    const s = state.zoom * dpr;
    return { s, tx: Math.round(canvas.width / 2 - s * state.cx), ty: Math.round(canvas.height / 2 - s * state.cy) };
  }

  function draw() {
    if (!image || els.result.hidden) return;
    if (dirty) recompose();
    const pairs = state.side ? [[els.plain, buffers.plain], [els.view, buffers.overlay]] : [[els.view, buffers.overlay]];
    for (const [canvas, buffer] of pairs) {
      const dpr = sizeCanvas(canvas);
      const t = transformFor(canvas, dpr);
      const ctx = canvas.getContext("2d");
      ctx.setTransform(1, 0, 0, 1, 0, 0);
      ctx.fillStyle = "#000";
      ctx.fillRect(0, 0, canvas.width, canvas.height);
      ctx.imageSmoothingEnabled = state.zoom * dpr < 1;  // magnified pixels stay crisp squares
      ctx.setTransform(t.s, 0, 0, t.s, t.tx, t.ty);
      ctx.drawImage(buffer, 0, 0);
      canvas.dataset.view = JSON.stringify(t);
    }
    els.zoomLevel.textContent = `${Math.round(state.zoom * 100)}%`;
    els.readout.textContent = `Window centre ${els.wc.value}, width ${els.ww.value}${state.invert ? ", inverted" : ""}`;
    updateReportLink();
  }

  function updateReportLink() {
    if (!display) return;
    const q = new URLSearchParams({ center: els.wc.value, width: els.ww.value, invert: String(state.invert),
      opacity: String(state.opacity) });
    if (active) q.set("finding", active);
    els.dlReport.href = `${display.report_url}?${q}`;
  }

  // -- zoom and pan -----------------------------------------------------------------------

  function fitView() {
    if (!image) return;
    const rect = els.view.getBoundingClientRect();
    state.zoom = Math.min(rect.width / image.width, rect.height / image.height) || 1;
    state.cx = image.width / 2; state.cy = image.height / 2;
    schedule();
  }

  function zoomBy(factor, at) {  // `at`: {canvas, x, y} in CSS px; that image point stays put
    const z = Math.min(32, Math.max(0.05, state.zoom * factor));
    if (at) {
      const r = at.canvas.getBoundingClientRect();
      const dx = at.x - r.width / 2, dy = at.y - r.height / 2;
      const ix = state.cx + dx / state.zoom, iy = state.cy + dy / state.zoom;
      state.cx = ix - dx / z; state.cy = iy - dy / z;
    }
    state.zoom = z;
    schedule();
  }

  function panBy(dx, dy) { state.cx -= dx / state.zoom; state.cy -= dy / state.zoom; schedule(); }

  function setMode(pan) {
    state.pan = pan;
    els.modePan.setAttribute("aria-pressed", String(pan));
    els.modeWl.setAttribute("aria-pressed", String(!pan));
    els.stage.classList.toggle("panning", pan);
  }

  function setOpacity(value) {
    state.opacity = Math.min(1, Math.max(0, value));
    if (state.opacity > 0) lastOpacity = state.opacity;
    els.opacity.value = String(Math.round(state.opacity * 100));
    els.opacityValue.textContent = `${Math.round(state.opacity * 100)}%`;
    dirty = true; schedule();
  }

  function setSide(on) {
    state.side = on;
    els.side.checked = on;
    els.plain.hidden = !on;
    els.stage.classList.toggle("side", on);
    dirty = true; schedule();
  }

  function setInvert(on) { state.invert = on; els.invert.checked = on; changed(); }

  function applyPreset(name) {
    const w = presetWindow(name);
    if (w) { setWindow(...w); say(`Window: ${name === "full" ? "full range" : name}.`); }
  }

  function resetAll() {
    setInvert(false);
    setWindow(...initialWindow);
    setOpacity(1);
    fitView();
    say("View reset.");
  }

  // Drag: window/level by default, pan with Shift, the Pan mode or a middle button.
  const WL_STEPS = 512;  // a drag across 512 px moves the window by the image's whole range
  const touches = new Map();  // pointerId -> last position, for two-finger pinch zoom
  function pinch(e) {
    const before = [...touches.values()];
    touches.set(e.pointerId, { x: e.clientX, y: e.clientY });
    const after = [...touches.values()];
    const dist = (a) => Math.hypot(a[0].x - a[1].x, a[0].y - a[1].y);
    const r = e.currentTarget.getBoundingClientRect();
    const mid = { canvas: e.currentTarget, x: (after[0].x + after[1].x) / 2 - r.left, y: (after[0].y + after[1].y) / 2 - r.top };
    if (dist(before) > 0) zoomBy(dist(after) / dist(before), mid);
  }

  function onPointerDown(e) {
    if (!image) return;
    const canvas = e.currentTarget;
    canvas.setPointerCapture(e.pointerId);
    if (e.pointerType === "touch") {
      touches.set(e.pointerId, { x: e.clientX, y: e.clientY });
      const forget = () => touches.delete(e.pointerId);
      canvas.addEventListener("pointerup", forget, { once: true });
      canvas.addEventListener("pointercancel", forget, { once: true });
    }
    const panning = state.pan || e.shiftKey || e.button === 1;
    const start = { x: e.clientX, y: e.clientY, centre: state.centre, width: state.width };
    const step = (display.stored_max - display.stored_min + 1) / WL_STEPS;
    let last = { x: e.clientX, y: e.clientY };
    const move = (ev) => {
      if (touches.size === 2 && touches.has(ev.pointerId)) { pinch(ev); return; }
      if (touches.size > 2 || ev.pointerId !== e.pointerId) return;
      if (panning) { panBy(ev.clientX - last.x, ev.clientY - last.y); last = { x: ev.clientX, y: ev.clientY }; return; }
      setWindow(start.centre + (ev.clientY - start.y) * step, start.width + (ev.clientX - start.x) * step);
    };
    const up = (ev) => {
      if (ev.pointerId !== e.pointerId) return;
      canvas.removeEventListener("pointermove", move);
      canvas.removeEventListener("pointerup", up);
      canvas.removeEventListener("pointercancel", up);
    };
    canvas.addEventListener("pointermove", move);
    canvas.addEventListener("pointerup", up);
    canvas.addEventListener("pointercancel", up);
    e.preventDefault();
  }

  function onWheel(e) {
    if (!image) return;
    e.preventDefault();
    const r = e.currentTarget.getBoundingClientRect();
    zoomBy(e.deltaY < 0 ? 1.1 : 1 / 1.1, { canvas: e.currentTarget, x: e.clientX - r.left, y: e.clientY - r.top });
  }

  // -- keyboard ---------------------------------------------------------------------------

  const SHORTCUTS = [
    ["?", "Show or hide this help", () => toggleHelp()],
    ["+", "Zoom in (×2)", () => zoomBy(2)],
    ["-", "Zoom out (÷2)", () => zoomBy(0.5)],
    ["f", "Fit the image", () => fitView()],
    ["1", "Actual size (1:1)", () => { state.zoom = 1 / (window.devicePixelRatio || 1); schedule(); }],
    ["Arrows", "Pan (Shift+arrows: window width and centre)", null],
    ["l", "Lung window", () => applyPreset("lung")],
    ["m", "Mediastinum window", () => applyPreset("mediastinum")],
    ["b", "Bone window", () => applyPreset("bone")],
    ["d", "The DICOM's own window", () => applyPreset("dicom")],
    ["a", "Full range", () => applyPreset("full")],
    ["i", "Invert", () => setInvert(!state.invert)],
    ["r", "Reset window, zoom, invert and opacity", () => resetAll()],
    ["o", "Heatmap on or off", () => setOpacity(state.opacity > 0 ? 0 : lastOpacity)],
    ["[", "Heatmap opacity −10%", () => setOpacity(state.opacity - 0.1)],
    ["]", "Heatmap opacity +10%", () => setOpacity(state.opacity + 0.1)],
    ["s", "Side by side on or off", () => setSide(!state.side)],
    ["p", "Drag pans / drag windows", () => setMode(!state.pan)],
    ["Esc", "Close this help", () => toggleHelp(false)],
  ];
  const KEYS = new Map(SHORTCUTS.filter(([, , fn]) => fn).map(([k, , fn]) => [k, fn]));
  KEYS.set("=", KEYS.get("+")); KEYS.set("Escape", KEYS.get("Esc")); KEYS.delete("Esc");

  function toggleHelp(show = els.help.hidden) {
    if (!show && els.help.contains(document.activeElement)) els.helpToggle.focus();  // focus stays on the page
    els.help.hidden = !show;
    els.helpToggle.setAttribute("aria-expanded", String(show));
    if (show) $("help-close").focus();
  }

  function onKey(e) {
    const t = e.target;
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    if (t && (t.tagName === "TEXTAREA" || (t.tagName === "INPUT" && ["number", "text", "date"].includes(t.type)))) return;
    if (e.key === "Escape" && els.help.hidden) return;
    if (e.key === "?" || e.key === "Escape") { KEYS.get(e.key)(); e.preventDefault(); return; }
    if (!image || els.result.hidden) return;
    const arrows = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1] };
    if (arrows[e.key]) {
      if (!t || !t.classList || !t.classList.contains("view")) return;  // arrows keep their meaning elsewhere
      const [dx, dy] = arrows[e.key];
      const step = (display.stored_max - display.stored_min + 1) / 64;
      if (e.shiftKey) setWindow(state.centre - dy * step, state.width + dx * step);
      else panBy(-dx * 40, -dy * 40);
      e.preventDefault();
      return;
    }
    const fn = KEYS.get(e.key);
    if (fn) { fn(); e.preventDefault(); }
  }

  // -- findings ---------------------------------------------------------------------------

  function summaryText(prediction) {
    const pos = prediction.findings.filter((f) => f.positive);
    if (pos.length === 0) {
      const top = prediction.findings[0];
      return `No finding above its threshold. Highest: ${top.finding} at ${pct(top.probability)}.`;
    }
    const names = pos.map((f) => `${f.finding} (${pct(f.probability)})`).join(", ");
    return `${pos.length} finding${pos.length > 1 ? "s" : ""} above threshold: ${names}.`;
  }

  // Bars diverge from the threshold at the centre, on a log-odds scale (±SPAN).
  const SPAN = 4;
  const logit = (p) => Math.log(Math.max(1e-6, p) / Math.max(1e-6, 1 - p));
  const barPosition = (p, t) => Math.min(1, Math.max(0, 0.5 + (logit(p) - logit(t)) / (2 * SPAN)));

  function element(tag, className, text) {
    const e = document.createElement(tag);
    if (className) e.className = className;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function renderFindings(analysis) {
    const { prediction } = analysis;
    const camAvailable = Boolean(display && display.heat_url);
    els.camHint.hidden = !camAvailable;
    els.summary.textContent = summaryText(prediction);
    const warnings = prediction.warnings || [];
    const items = (prefix) => warnings.map((w) => element("li", "", `${prefix}${w}`));
    els.warnings.replaceChildren(...items("Warning: "));
    els.warnings.hidden = warnings.length === 0;
    if (warnings.length) els.warnings.append(element("li", "hint", "Findings above threshold are shown muted while a warning stands: read them with caution."));
    els.imageWarnings.replaceChildren(...items("⚠ "));
    els.imageWarnings.hidden = warnings.length === 0;
    els.findings.classList.toggle("warned", warnings.length > 0);
    els.policy.textContent = prediction.threshold_policy
      ? `Thresholds: operating point "${prediction.threshold_policy}" (chosen on validation data).` : "";
    els.findings.replaceChildren();
    for (const f of prediction.findings) {
      const li = element("li", "finding" + (f.positive ? " positive" : ""));
      li.dataset.finding = f.finding;
      const head = element("div", "finding-head");
      head.append(element("span", "name", f.finding));
      if (f.positive) head.append(element("span", "badge", warnings.length ? "above threshold (see warning)" : "above threshold"));
      head.append(element("span", "prob", pct(f.probability)));
      const bar = element("div", "bar");
      bar.setAttribute("aria-hidden", "true");
      const x = barPosition(f.probability, f.threshold);
      const fill = element("div", "fill " + (x >= 0.5 ? "right" : "left"));
      fill.style.left = `${100 * Math.min(x, 0.5)}%`;
      fill.style.width = `${100 * Math.abs(x - 0.5)}%`;
      bar.append(fill, element("div", "tick"));
      const meter = element("div", "meter");
      meter.append(bar, element("span", "threshold", `threshold ${pct(f.threshold)}`));
      li.append(head, meter);
      if (camAvailable) {
        const button = element("button", "button cam-toggle", "Grad-CAM");
        button.type = "button";
        button.setAttribute("aria-pressed", "false");
        button.setAttribute("aria-label", `Grad-CAM overlay for ${f.finding}`);
        button.addEventListener("click", () => toggleCam(f, button));
        li.append(button);
      }
      els.findings.append(li);
    }
  }

  // -- about this model -------------------------------------------------------------------

  const POLICIES = {
    f1: "the score that gave the best F1 (balance of precision and recall)",
    youden: "the score that maximised sensitivity + specificity (Youden's J)",
  };

  function modelSentences(m) {
    const out = [];
    const t = m.training || {};
    const images = t.images || {}, patients = t.patients || {}, split = t.split || {};
    if (t.dataset_root || images.train) {
      let s = `Trained on ${images.train ?? "?"} chest X-rays` + (patients.train ? ` of ${patients.train} patients` : "")
        + (t.dataset_root ? ` from ${t.dataset_root}` : "") + ".";
      if (images.val) s += ` Checked on ${images.val} held-out images` + (patients.val ? ` of ${patients.val} other patients` : "") + ".";
      const v = split.validation;
      if (v && typeof v === "object" && v.fraction) s += ` The held-out part is ${Math.round(v.fraction * 100)}% of the patients, split by ${v.by || "patient"}, so no patient is in both.`;
      if (typeof split.test === "string") s += ` Test set: ${split.test}.`;
      out.push(s);
    } else if (typeof t.data === "string") {
      out.push(`Training data: ${t.data}.`);
    }
    out.push(`It reads a ${m.preprocessing.size} × ${m.preprocessing.size} px grayscale copy of the image (${m.variant || m.backend}).`);
    const op = m.operating_point;
    if (op && op.policy) {
      out.push(`Each finding's threshold is ${POLICIES[op.policy] || `set by the "${op.policy}" policy`} on the validation images${op.tuned_on ? ` (${op.tuned_on})` : ""}.`);
    } else {
      out.push("Thresholds come with the model file.");
    }
    const fallback = ((m.metrics || {}).validation || {}).threshold_fallback || [];
    if (fallback.length) out.push(`${fallback.join(", ")} had no positive or no negative validation image, so their threshold is 50%.`);
    const c = m.calibration;
    out.push(c ? `Scores are calibrated (${c.method === "temperature" ? "temperature scaling" : c.method}, one per finding) on ${c.fitted_on || "the validation images"}, so a score of 20% means about 1 in 5 such images had the finding there.`
      : "Scores are not calibrated: read them as rankings, not frequencies.");
    if (m.input_check) out.push("Images unlike the training X-rays are flagged with a warning.");
    return out;
  }

  async function loadModelFacts() {
    try {
      const resp = await fetch("/api/v1/model");
      if (!resp.ok) return;
      const m = await resp.json();
      const parts = modelSentences(m).map((s) => element("p", "", s));
      const v = (m.metrics || {}).validation || {};
      const per = v.per_class || {};
      if (Object.keys(per).length) {
        const macro = v.macro && typeof v.macro.auroc === "number" ? ` (mean ${v.macro.auroc.toFixed(2)})` : "";
        parts.push(element("p", "", `How well it separates positives from negatives on the validation images, per finding (AUROC: 0.5 is chance, 1 is perfect)${macro}:`));
        const table = element("table", "auroc");
        const head = element("tr");
        for (const h of ["Finding", "AUROC", "Positives", "Threshold"]) head.append(element("th", "", h));
        table.append(head);
        for (const [name, r] of Object.entries(per)) {
          const row = element("tr");
          row.append(element("td", "", name), element("td", "", typeof r.auroc === "number" ? r.auroc.toFixed(2) : "n/a"),
            element("td", "", String(r.support ?? "")), element("td", "", m.thresholds[name] !== undefined ? pct(m.thresholds[name]) : ""));
          table.append(row);
        }
        parts.push(table);
      }
      els.facts.replaceChildren(...parts);
    } catch (_) { /* the facts are optional */ }
  }

  // -- studies on the PACS (only when the server was started with --dicomweb) --------------

  let openStudy = null;  // {study, series, sop} of the analysed study image
  let studyQuery = { offset: 0 };

  async function loadStudies(offset = 0) {
    const q = new URLSearchParams({ offset: String(offset), limit: "20" });
    const day = (id) => $(id).value.replaceAll("-", "");
    if (day("study-from")) q.set("date_from", day("study-from"));
    if (day("study-to")) q.set("date_to", day("study-to"));
    if ($("study-accession").value.trim()) q.set("accession", $("study-accession").value.trim());
    const resp = await fetch(`/api/v1/studies?${q}`);
    $("studies").hidden = false;
    if (!resp.ok) { fail(`The study list could not be loaded: ${await errorText(resp)}`); return; }
    const page = await resp.json();
    studyQuery = { offset: page.offset, more: page.more, limit: page.limit };
    const names = page.studies.some((s) => s.patient_name);
    $("studies").classList.toggle("with-names", names);
    $("study-rows").replaceChildren(...page.studies.map((s) => {
      const tr = element("tr");
      const date = s.date.length === 8 ? `${s.date.slice(0, 4)}-${s.date.slice(4, 6)}-${s.date.slice(6)}` : s.date;
      tr.append(element("td", "", date), element("td", "", s.accession), element("td", "", s.description),
        element("td", "patient", s.patient_name || ""), element("td", "", s.images ?? ""),
        element("td", "", s.has_result ? "in the PACS" : "none yet"));
      const cell = element("td");
      const open = element("button", "button tool", "Open");
      open.type = "button";
      open.setAttribute("aria-label", `Open the study of ${date}${s.accession ? `, accession ${s.accession}` : ""}`);
      open.addEventListener("click", () => openStudyImage(s.study_uid));
      cell.append(open);
      tr.append(cell);
      return tr;
    }));
    $("study-prev").disabled = page.offset === 0;
    $("study-next").disabled = !page.more;
  }

  async function openStudyImage(study) {
    say("Fetching the study's image from the PACS…");
    const resp = await fetch(`/api/v1/studies/${encodeURIComponent(study)}/image`);
    if (!resp.ok) { fail(`The study could not be fetched: ${await errorText(resp)}`); say(""); return; }
    const ref = { study, series: resp.headers.get("X-Series-UID"), sop: resp.headers.get("X-SOP-UID") };
    await analyse(new File([await resp.blob()], "upload", { type: "application/dicom" }), ref);
  }

  async function sendToPacs() {
    if (!current || !openStudy) return;
    const q = new URLSearchParams({ analysis: current.id, series: openStudy.series, sop: openStudy.sop });
    say("Sending the results to the PACS…");
    const resp = await fetch(`/api/v1/studies/${encodeURIComponent(openStudy.study)}/results?${q}`, { method: "POST" });
    if (!resp.ok) { fail(`The results could not be sent: ${await errorText(resp)}`); say(""); return; }
    say("The results were stored in the study as a DICOM SR.");
    loadStudies(studyQuery.offset);
  }

  // -- wiring -----------------------------------------------------------------------------

  $("study-search").addEventListener("submit", (e) => { e.preventDefault(); loadStudies(0); });
  $("study-prev").addEventListener("click", () => loadStudies(Math.max(0, studyQuery.offset - (studyQuery.limit || 20))));
  $("study-next").addEventListener("click", () => loadStudies(studyQuery.offset + (studyQuery.limit || 20)));
  $("send-pacs").addEventListener("click", sendToPacs);

  els.file.addEventListener("change", () => analyse(els.file.files[0]));
  els.forget.addEventListener("click", async () => {
    await clearResult();
    say("The image was forgotten by the server and this page.");
    els.file.focus();
  });
  for (const c of [els.view, els.plain]) {
    c.addEventListener("pointerdown", onPointerDown);
    c.addEventListener("wheel", onWheel, { passive: false });
  }
  $("zoom-in").addEventListener("click", () => zoomBy(2));
  $("zoom-out").addEventListener("click", () => zoomBy(0.5));
  $("zoom-fit").addEventListener("click", fitView);
  $("zoom-one").addEventListener("click", () => KEYS.get("1")());
  $("reset").addEventListener("click", resetAll);
  els.modeWl.addEventListener("click", () => setMode(false));
  els.modePan.addEventListener("click", () => setMode(true));
  for (const b of document.querySelectorAll("[data-preset]")) b.addEventListener("click", () => applyPreset(b.dataset.preset));
  const fromInputs = () => {
    const c = Number(els.wc.value), w = Number(els.ww.value);
    if (Number.isFinite(c) && Number.isFinite(w) && w > 0 && display) {
      setWindow((c - display.value_offset) / display.value_slope, w / display.value_slope);
    }
  };
  els.wc.addEventListener("change", fromInputs);
  els.ww.addEventListener("change", fromInputs);
  els.invert.addEventListener("change", () => setInvert(els.invert.checked));
  els.opacity.addEventListener("input", () => setOpacity(Number(els.opacity.value) / 100));
  els.side.addEventListener("change", () => setSide(els.side.checked));
  els.helpToggle.addEventListener("click", () => toggleHelp());
  $("help-close").addEventListener("click", () => toggleHelp(false));
  els.helpKeys.replaceChildren(...SHORTCUTS.map(([k, what]) => {
    const tr = element("tr");
    const key = element("td");
    key.append(element("kbd", "", k));
    tr.append(key, element("td", "", what));
    return tr;
  }));
  document.addEventListener("keydown", onKey);
  window.addEventListener("resize", schedule);

  // Drop anywhere: a missed drop must not make the browser open the file instead.
  for (const type of ["dragenter", "dragover"]) {
    document.addEventListener(type, (e) => { e.preventDefault(); els.drop.classList.add("dragging"); });
  }
  document.addEventListener("dragleave", (e) => { if (e.relatedTarget === null) els.drop.classList.remove("dragging"); });
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    els.drop.classList.remove("dragging");
    const file = e.dataTransfer && e.dataTransfer.files[0];
    if (file) analyse(file);
  });

  loadModelFacts();
  fetch("/api/v1/viewer").then((r) => r.json()).then((c) => { if (c.studies) loadStudies(); })
    .catch(() => { /* the study list is optional */ });
})();
