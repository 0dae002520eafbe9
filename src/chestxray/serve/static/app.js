// chestxray viewer: upload one radiograph, show findings, toggle Grad-CAM overlays.
// Vanilla JS, no third-party code; talks only to this server's /api/v1.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const els = {
    file: $("file"), drop: $("drop"), status: $("status"), error: $("error"), result: $("result"),
    xray: $("xray"), overlay: $("overlay"), caption: $("caption"), legend: $("legend"), legendScale: $("legend-scale"),
    findings: $("findings"), summary: $("summary"), forget: $("forget"), camHint: $("cam-hint"),
    heading: $("findings-heading"), facts: $("model-facts"),
    warnings: $("warnings"), policy: $("policy"),
  };
  let current = null;        // the analysis response
  let active = null;         // finding whose overlay is shown
  let camUrls = new Map();   // finding -> object URL of its overlay PNG
  let camNotes = new Map();  // finding -> "no positive evidence for X" (an empty map)
  let busy = false;

  const pct = (p) => `${(100 * p).toFixed(1)}%`;

  function say(text) { els.status.textContent = text; }
  function fail(text) {
    els.error.textContent = text;
    els.error.hidden = !text;
  }

  async function errorText(resp) {
    try {
      const body = await resp.json();
      if (typeof body.detail === "string") return body.detail;
      if (Array.isArray(body.detail)) return body.detail.map((d) => d.msg).join("; ");
    } catch (_) { /* not JSON */ }
    return `${resp.status} ${resp.statusText}`;
  }

  function resetOverlays() {
    for (const url of camUrls.values()) URL.revokeObjectURL(url);
    camUrls = new Map();
    camNotes = new Map();
    active = null;
    els.overlay.hidden = true;
    els.overlay.removeAttribute("src");
    els.legend.hidden = true;
    els.caption.textContent = "Radiograph as decoded by the server.";
  }

  // After a failed upload nothing of the previous image may stay on screen under the error.
  async function clearResult() {
    await forgetCurrent();
    resetOverlays();
    els.result.hidden = true;
    els.xray.removeAttribute("src");
    els.findings.replaceChildren();
    els.summary.textContent = "";
  }

  async function forgetCurrent() {
    if (!current) return;
    const id = current.id;
    current = null;
    try { await fetch(`/api/v1/analyses/${encodeURIComponent(id)}`, { method: "DELETE" }); } catch (_) { /* gone */ }
  }

  async function analyse(file) {
    if (!file || busy) return;
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
      resetOverlays();
      current = analysis;
      await showImage(analysis);
      renderFindings(analysis);
      els.result.hidden = false;
      say(summaryText(analysis.prediction));
    } catch (err) {
      await clearResult();
      say("");
      fail(`The server could not be reached (${err.message}).`);
    } finally {
      busy = false;
      els.drop.classList.remove("working");
      els.file.value = "";
    }
  }

  function showImage(analysis) {
    return new Promise((resolve) => {
      els.xray.onload = () => resolve();
      els.xray.onerror = () => { fail("The decoded image could not be loaded."); resolve(); };
      els.xray.width = analysis.width;
      els.xray.height = analysis.height;
      els.xray.src = analysis.image_url;
    });
  }

  function summaryText(prediction) {
    const pos = prediction.findings.filter((f) => f.positive);
    if (pos.length === 0) {
      const top = prediction.findings[0];
      return `No finding above its threshold. Highest: ${top.finding} at ${pct(top.probability)}.`;
    }
    const names = pos.map((f) => `${f.finding} (${pct(f.probability)})`).join(", ");
    return `${pos.length} finding${pos.length > 1 ? "s" : ""} above threshold: ${names}.`;
  }

  function renderFindings(analysis) {
    const { prediction } = analysis;
    const camAvailable = Boolean(analysis.cam_url);
    els.camHint.hidden = !camAvailable;
    els.summary.textContent = summaryText(prediction);
    // Warnings (input unlike the training X-rays, lateral or non-chest DICOM) sit next to the findings.
    const warnings = prediction.warnings || [];
    els.warnings.replaceChildren(...warnings.map((w) => {
      const li = document.createElement("li"); li.textContent = `Warning: ${w}`; return li;
    }));
    els.warnings.hidden = warnings.length === 0;
    els.policy.textContent = prediction.threshold_policy
      ? `Thresholds: operating point "${prediction.threshold_policy}" (chosen on validation data).` : "";
    els.findings.replaceChildren();
    for (const f of prediction.findings) {
      const li = document.createElement("li");
      li.className = "finding" + (f.positive ? " positive" : "");
      li.dataset.finding = f.finding;

      const head = document.createElement("div");
      head.className = "finding-head";
      const name = document.createElement("span");
      name.className = "name";
      name.textContent = f.finding;
      head.append(name);
      if (f.positive) {
        const badge = document.createElement("span");
        badge.className = "badge";
        badge.textContent = "above threshold";
        head.append(badge);
      }
      const prob = document.createElement("span");
      prob.className = "prob";
      prob.textContent = pct(f.probability);
      head.append(prob);

      const bar = document.createElement("div");
      bar.className = "bar";
      bar.setAttribute("aria-hidden", "true");
      const fill = document.createElement("div");
      fill.className = "fill";
      fill.style.width = pct(f.probability);
      const tick = document.createElement("div");
      tick.className = "tick";
      tick.style.left = pct(f.threshold);
      tick.title = `threshold ${pct(f.threshold)}`;
      bar.append(fill, tick);
      const thr = document.createElement("span");
      thr.className = "threshold";
      thr.textContent = `threshold ${pct(f.threshold)}`;
      const meter = document.createElement("div");
      meter.className = "meter";
      meter.append(bar, thr);

      li.append(head, meter);
      if (camAvailable) {
        const button = document.createElement("button");
        button.type = "button";
        button.className = "button cam-toggle";
        button.setAttribute("aria-pressed", "false");
        button.setAttribute("aria-label", `Grad-CAM overlay for ${f.finding}`);
        button.textContent = "Grad-CAM";
        button.addEventListener("click", () => toggleCam(f, button));
        li.append(button);
      }
      els.findings.append(li);
    }
  }

  async function toggleCam(finding, button) {
    if (!current) return;
    const name = finding.finding;
    for (const b of els.findings.querySelectorAll(".cam-toggle")) {
      if (b !== button) b.setAttribute("aria-pressed", "false");
    }
    if (active === name) {
      active = null;
      button.setAttribute("aria-pressed", "false");
      els.overlay.hidden = true;
      els.legend.hidden = true;
      els.caption.textContent = "Radiograph as decoded by the server.";
      say(`Grad-CAM for ${name} hidden.`);
      return;
    }
    active = name;
    button.setAttribute("aria-pressed", "true");
    const analysisId = current.id;
    let url = camUrls.get(name);
    if (!url) {
      say(`Computing Grad-CAM for ${name}…`);
      button.classList.add("working");
      try {
        const resp = await fetch(`${current.cam_url}?finding=${encodeURIComponent(name)}`);
        if (!resp.ok) throw new Error(await errorText(resp));
        const note = resp.headers.get("X-Grad-CAM-Note");
        if (note) camNotes.set(name, note);
        url = URL.createObjectURL(await resp.blob());
      } catch (err) {
        if (active === name) { active = null; button.setAttribute("aria-pressed", "false"); }
        fail(`Grad-CAM for ${name} failed: ${err.message}`);
        say("");
        return;
      } finally {
        button.classList.remove("working");
      }
      if (!current || current.id !== analysisId) { URL.revokeObjectURL(url); return; }
      camUrls.set(name, url);
    }
    if (active !== name) return;  // another toggle was pressed meanwhile
    fail("");
    els.overlay.src = url;
    els.overlay.alt = `Grad-CAM for ${name} laid over the radiograph`;
    els.overlay.hidden = false;
    const note = camNotes.get(name);
    if (!els.legendScale.getAttribute("src")) els.legendScale.src = "/static/cam-legend.png";
    els.legend.hidden = Boolean(note);  // an empty map has nothing to read off the scale
    els.caption.textContent = note
      ? `Grad-CAM for ${name} (${pct(finding.probability)}): ${note}; nothing in the image raised this score.`
      : `Grad-CAM for ${name} (${pct(finding.probability)}): where the image raised this score.`;
    say(`Grad-CAM for ${name} shown.`);
  }

  async function loadModelFacts() {
    try {
      const resp = await fetch("/api/v1/model");
      if (!resp.ok) return;
      const m = await resp.json();
      const facts = [
        ["Name", m.name],
        ["Backend", m.backend],
        ["Input", `${m.preprocessing.size} × ${m.preprocessing.size} px, grayscale`],
        ["Thresholds", m.threshold_method || "from the bundle"],
      ];
      if (m.operating_point) facts.push(["Threshold policy", m.operating_point.policy]);
      if (m.calibration) facts.push(["Calibration", `${m.calibration.method} (fitted on ${m.calibration.fitted_on || "validation"})`]);
      if (m.input_check) facts.push(["Input check cut-off", m.input_check.cutoff.toFixed(1)]);
      for (const [k, v] of Object.entries(m.metrics || {})) {
        if (typeof v === "number") facts.push([k, Number.isInteger(v) ? String(v) : v.toFixed(3)]);
      }
      for (const [k, v] of Object.entries(m.training || {})) {
        if (typeof v === "string" || typeof v === "number") facts.push([`training ${k}`, String(v)]);
      }
      els.facts.replaceChildren(...facts.flatMap(([k, v]) => {
        const dt = document.createElement("dt"); dt.textContent = k;
        const dd = document.createElement("dd"); dd.textContent = v;
        return [dt, dd];
      }));
    } catch (_) { /* the facts are optional */ }
  }

  els.file.addEventListener("change", () => analyse(els.file.files[0]));
  els.forget.addEventListener("click", async () => {
    await clearResult();
    say("The image was forgotten by the server and this page.");
    els.file.focus();
  });

  // Drop anywhere: a missed drop must not make the browser open the file instead.
  for (const type of ["dragenter", "dragover"]) {
    document.addEventListener(type, (e) => { e.preventDefault(); els.drop.classList.add("dragging"); });
  }
  document.addEventListener("dragleave", (e) => {
    if (e.relatedTarget === null) els.drop.classList.remove("dragging");
  });
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    els.drop.classList.remove("dragging");
    const file = e.dataTransfer && e.dataTransfer.files[0];
    if (file) analyse(file);
  });

  loadModelFacts();
})();
