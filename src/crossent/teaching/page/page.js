// crossent tour page: the unit switch, the interactive figures and the quiz (no network).
// The formulas below are a second implementation of crossent's (surprisal, entropy,
// cross-entropy, softmax cross-entropy with label smoothing, binary and multi-label
// cross-entropy); tests/cli/test_page_browser.py drives the page in Chromium and checks every
// number it shows against the library.
"use strict";
(function () {
  const root = document.documentElement;
  root.classList.replace("no-js", "js");
  const LN_BASE = { bits: Math.LN2, nats: 1, hartleys: Math.LN10 };
  let unit = root.dataset.unit;

  // ---- arithmetic (natural logs; divided by ln(base) for the unit) ------------------------
  const inUnit = (nats) => nats / LN_BASE[unit];
  const sum = (xs) => xs.reduce((a, b) => a + b, 0);
  const xlogy = (x, y) => (x === 0 ? 0 : x * Math.log(y)); // 0 log 0 = 0
  const surprisal = (p) => inUnit(-Math.log(p));
  const entropyTerms = (p) => p.map((pi) => inUnit(-xlogy(pi, pi)));
  const crossTerms = (p, q) => p.map((pi, i) => inUnit(-xlogy(pi, q[i])));
  const smooth = (t, alpha) => t.map((ti) => (1 - alpha) * ti + alpha / t.length);
  function logSoftmax(z) {
    const m = Math.max(...z);
    const lse = m + Math.log(sum(z.map((v) => Math.exp(v - m))));
    return z.map((v) => v - lse);
  }
  const oneHot = (k, n) => Array.from({ length: n }, (_, i) => (i === k ? 1 : 0));
  // a label's binary cross-entropy, logs clamped at -100 as crossent.binary_cross_entropy
  function bceTerms(q, t) {
    const pos = t === 0 ? 0 : -t * Math.max(Math.log(q), -100);
    const neg = t === 1 ? 0 : -(1 - t) * Math.max(Math.log1p(-q), -100);
    return [inUnit(pos), inUnit(neg)];
  }

  // ---- number display: at least 6 significant digits ---------------------------------------
  function fmt(x) {
    if (x === Infinity || x === -Infinity) return x > 0 ? "∞" : "−∞";
    if (Number.isNaN(x)) return "NaN";
    return x === 0 || Math.abs(x) >= 0.1 ? x.toFixed(6) : x.toPrecision(6);
  }

  // ---- keeping probabilities summing to 1 --------------------------------------------------
  // Slider k moved to v: the others share 1 - v in proportion to their previous values, none
  // below lo (the sliders' minimum), so that every value stays where its slider can show it.
  function renormalise(p, k, v, lo) {
    const out = p.slice();
    out[k] = v;
    const free = new Set(p.keys());
    free.delete(k);
    while (free.size) {
      const budget = 1 - v - lo * (p.length - 1 - free.size);
      const rest = sum([...free].map((i) => p[i]));
      for (const i of free) out[i] = rest > 0 ? (p[i] * budget) / rest : budget / free.size;
      const low = [...free].filter((i) => out[i] < lo);
      if (!low.length) break;
      for (const i of low) { out[i] = lo; free.delete(i); }
    }
    return out;
  }

  // ---- tiny SVG drawings ---------------------------------------------------------------------
  const SVG = "http://www.w3.org/2000/svg";
  function el(parent, tag, attrs, text) {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    parent.appendChild(e);
    return e;
  }
  const W = 320, H = 180, PAD = { l: 40, r: 10, t: 24, b: 30 };
  const tick = (y) => (Math.abs(y) >= 100 ? y.toFixed(0) : y.toPrecision(2));
  function frame(svg, xlabel, ylabel) {
    svg.replaceChildren();
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    el(svg, "line", { class: "axis", x1: PAD.l, y1: H - PAD.b, x2: W - PAD.r, y2: H - PAD.b });
    el(svg, "line", { class: "axis", x1: PAD.l, y1: PAD.t, x2: PAD.l, y2: H - PAD.b });
    el(svg, "text", { x: (W + PAD.l) / 2, y: H - 4, "text-anchor": "middle" }, xlabel);
    el(svg, "text", { x: 4, y: 11 }, ylabel); // above the plot, never over the data
  }
  // y against x (x in [0, 1]), with one point marked
  function curve(svg, xs, ys, point, xlabel, ylabel) {
    frame(svg, xlabel, ylabel);
    const ymax = Math.max(...ys.filter(Number.isFinite), point[1], 1e-9);
    const sx = (x) => PAD.l + x * (W - PAD.l - PAD.r);
    const sy = (y) => H - PAD.b - (y / ymax) * (H - PAD.t - PAD.b);
    const d = xs.map((x, i) => `${i ? "L" : "M"}${sx(x).toFixed(1)},${sy(ys[i]).toFixed(1)}`);
    el(svg, "path", { class: "curve", d: d.join("") });
    el(svg, "circle", { class: "dot", cx: sx(point[0]), cy: sy(point[1]), r: 5 });
    el(svg, "text", { x: PAD.l - 4, y: PAD.t + 4, "text-anchor": "end" }, tick(ymax));
    el(svg, "text", { x: PAD.l - 4, y: H - PAD.b, "text-anchor": "end" }, "0");
    for (const x of [0, 0.5, 1]) {
      el(svg, "text", { x: sx(x), y: H - PAD.b + 12, "text-anchor": "middle" }, String(x));
    }
  }
  // groups of bars (one group per class, one bar per series, a legend); values may be negative
  function bars(svg, series, labels, ylabel) {
    frame(svg, "", ylabel);
    const all = series.flatMap((s) => s.values).filter(Number.isFinite);
    const hi = Math.max(...all, 0), lo = Math.min(...all, 0);
    const span = hi - lo || 1;
    const sy = (y) => PAD.t + ((hi - y) / span) * (H - PAD.t - PAD.b);
    const gw = (W - PAD.l - PAD.r) / labels.length;
    const bw = (gw * 0.7) / series.length;
    el(svg, "line", { class: "axis", x1: PAD.l, y1: sy(0), x2: W - PAD.r, y2: sy(0) });
    for (const y of new Set([hi, 0, lo])) {
      el(svg, "text", { x: PAD.l - 4, y: sy(y) + 4, "text-anchor": "end" }, tick(y));
    }
    labels.forEach((label, i) => {
      const x0 = PAD.l + i * gw + gw * 0.15;
      series.forEach((s, j) => {
        const v = Number.isFinite(s.values[i]) ? s.values[i] : hi;
        el(svg, "rect", { class: s.cls, x: x0 + j * bw, width: bw - 2,
                          y: Math.min(sy(v), sy(0)), height: Math.abs(sy(v) - sy(0)) });
      });
      el(svg, "text", { x: x0 + gw * 0.35, y: H - 8, "text-anchor": "middle" }, label);
    });
    let x = W - PAD.r; // the legend, right-aligned on the top line
    for (const s of series.slice().reverse()) {
      const text = el(svg, "text", { x, y: 11, "text-anchor": "end" }, s.name);
      x -= (text.getComputedTextLength() || 6 * s.name.length) + 14; // 0 while not drawn
      el(svg, "rect", { class: s.cls, x: x + 2, y: 3, width: 9, height: 9 });
      x -= 8;
    }
  }

  // ---- widgets ---------------------------------------------------------------------------------
  function widget(w) {
    const input = (key) => w.querySelector(`[data-in="${key}"]`);
    const value = (key) => Number(input(key).value);
    const checked = (key) => input(key).checked;
    // every number shown keeps its exact value in data-value (the browser test reads it)
    const show = (key, x, asTyped = false) => {
      const out = w.querySelector(`[data-out="${key}"]`);
      out.dataset.value = String(x);
      out.textContent = asTyped ? String(Number(x.toPrecision(6))) : fmt(x);
    };
    const showAll = (prefix, xs) => xs.forEach((x, i) => show(prefix + i, x));
    const svg = w.querySelector("svg");
    return { w, input, value, checked, show, showAll, svg };
  }

  // a group of sliders p0..p(n-1) kept summing to 1
  function distribution(ui, prefix, n, initial) {
    let p = initial.slice();
    const lo = Number(ui.input(prefix + "0").min);
    const sync = () => p.forEach((pi, i) => {
      ui.input(prefix + i).value = String(pi);
      ui.show(prefix + i, pi, true);
    });
    for (let i = 0; i < n; i++) {
      ui.input(prefix + i).addEventListener("input", () => {
        p = renormalise(p, i, ui.value(prefix + i), lo);
        sync();
      });
    }
    sync();
    return () => p;
  }

  const WIDGETS = {
    surprise(ui) {
      const xs = Array.from({ length: 200 }, (_, i) => 0.001 + (i / 199) * 0.999);
      return () => {
        const p = ui.value("p");
        ui.show("p", p, true);
        ui.show("s", surprisal(p));
        curve(ui.svg, xs, xs.map(surprisal), [p, surprisal(p)], "probability p",
              `surprise (${unit})`);
      };
    },
    entropy(ui) {
      const p = distribution(ui, "p", 3, [0.2, 0.3, 0.5]);
      return () => {
        const terms = entropyTerms(p());
        ui.showAll("term", terms);
        ui.show("h", sum(terms));
        bars(ui.svg, [{ cls: "bar-a", name: "p", values: p() },
                      { cls: "bar-b", name: `p·log(1/p), ${unit}`, values: terms }],
             ["panda", "bird", "dog"], "");
      };
    },
    "cross-entropy"(ui) {
      const p = distribution(ui, "p", 3, [0.2, 0.3, 0.5]);
      const q = distribution(ui, "q", 3, [0.1, 0.2, 0.7]);
      return () => {
        const terms = crossTerms(p(), q());
        const h = sum(entropyTerms(p())), c = sum(terms);
        ui.showAll("term", terms);
        ui.show("h", h);
        ui.show("c", c);
        ui.show("kl", sum(p().map((pi, i) => inUnit(xlogy(pi, pi) - xlogy(pi, q()[i])))));
        bars(ui.svg, [{ cls: "bar-a", name: "truth p", values: p() },
                      { cls: "bar-b", name: "prediction q", values: q() }],
             ["class 0", "class 1", "class 2"], "");
      };
    },
    logits(ui) {
      return () => {
        const z = [0, 1, 2].map((i) => ui.value("a" + i));
        const k = Number(ui.w.querySelector('[data-in="class"]:checked').value);
        const logq = logSoftmax(z), q = logq.map(Math.exp), t = oneHot(k, 3);
        z.forEach((v, i) => ui.show("a" + i, v, true));
        const terms = logq.map((lq, i) => (t[i] === 0 ? 0 : inUnit(-t[i] * lq)));
        ui.showAll("q", q);
        ui.showAll("term", terms);
        ui.show("loss", inUnit(-logq[k]));
        const grad = q.map((qi, i) => qi - t[i]);
        ui.showAll("grad", grad);
        bars(ui.svg, [{ cls: "bar-a", name: "softmax(a)", values: q },
                      { cls: "bar-b", name: "softmax(a) − b", values: grad }],
             ["class 0", "class 1", "class 2"], "");
      };
    },
    smoothing(ui) {
      const q = [0.1, 0.2, 0.7];
      return () => {
        const alpha = ui.value("alpha");
        ui.show("alpha", alpha, true);
        const t = smooth(oneHot(2, 3), alpha);
        const terms = crossTerms(t, q);
        ui.showAll("t", t);
        ui.showAll("term", terms);
        ui.show("loss", sum(terms));
        ui.showAll("grad", q.map((qi, i) => qi - t[i]));
        bars(ui.svg, [{ cls: "bar-a", name: "target", values: t },
                      { cls: "bar-b", name: `term, ${unit}`, values: terms }],
             ["class 0", "class 1", "class 2"], "");
      };
    },
    binary(ui) {
      return () => {
        const q = ui.value("q"), t = ui.checked("cat") ? 1 : 0;
        ui.show("q", q, true);
        const [pos, neg] = bceTerms(q, t);
        ui.show("pos", pos);
        ui.show("neg", neg);
        ui.show("loss", pos + neg);
        ui.show("grad", q - t);
        const xs = Array.from({ length: 200 }, (_, i) => 0.001 + (i / 199) * 0.998);
        curve(ui.svg, xs, xs.map((x) => sum(bceTerms(x, t))), [q, pos + neg],
              "predicted probability q0 of a cat", `loss (${unit})`);
      };
    },
    multilabel(ui) {
      return () => {
        const q = [0, 1, 2].map((j) => ui.value("q" + j));
        const t = [0, 1, 2].map((j) => (ui.checked("t" + j) ? 1 : 0));
        q.forEach((qj, j) => ui.show("q" + j, qj, true));
        const terms = q.map((qj, j) => sum(bceTerms(qj, t[j])));
        ui.showAll("term", terms);
        ui.show("loss", sum(terms));
        bars(ui.svg, [{ cls: "bar-a", name: "q", values: q },
                      { cls: "bar-c", name: `label's loss, ${unit}`, values: terms }],
             ["cat", "dog", "person"], "");
      };
    },
  };

  const redraws = [];
  for (const w of document.querySelectorAll("[data-widget]")) {
    const ui = widget(w);
    const redraw = WIDGETS[w.dataset.widget](ui);
    for (const c of w.querySelectorAll("input")) c.addEventListener("input", redraw);
    for (const c of w.querySelectorAll("input[type=checkbox], input[type=radio]")) {
      c.addEventListener("change", redraw);
    }
    redraws.push(redraw);
  }

  // ---- the unit switch -------------------------------------------------------------------------
  function setUnit(name) {
    unit = name;
    root.dataset.unit = name;
    for (const span of document.querySelectorAll(".unit-name")) span.textContent = name;
    redraws.forEach((r) => r());
  }
  for (const radio of document.querySelectorAll('input[name="unit"]')) {
    radio.checked = radio.value === unit;
    radio.addEventListener("change", () => setUnit(radio.value));
  }
  setUnit(unit);

  // ---- the quiz: answers in nats or bits, within the tolerance ---------------------------------
  // "0.357", "0,357" or "0.357 nats": with a unit, the answer is checked in that unit only.
  function parseAnswer(text) {
    const m = text.match(/^(\S+?)\s*(nats?|bits?)?$/i);
    const number = m ? m[1].replace(/^([-+]?\d*),(\d+)$/, "$1.$2") : "";
    const unit = m && m[2] ? m[2].toLowerCase().replace(/s?$/, "s") : null;
    return [number === "" ? NaN : Number(number), unit];
  }
  for (const q of document.querySelectorAll(".question[data-nats]")) {
    const answer = q.querySelector("input");
    const verdict = q.querySelector(".verdict");
    const check = () => {
      const text = answer.value.trim();
      const [given, unit] = parseAnswer(text);
      const tol = Number(q.dataset.tolerance);
      const ok = (unit ? [unit] : ["nats", "bits"])
        .some((u) => Math.abs(given - Number(q.dataset[u])) <= tol);
      const exact = `${fmt(Number(q.dataset.nats))} nats (${fmt(Number(q.dataset.bits))} bits)`;
      verdict.textContent = ok ? "Correct!" : (Number.isNaN(given)
        ? `“${text}” is not a number. The answer is ${exact}.`
        : `Not quite: the answer is ${exact}.`);
      verdict.className = "verdict " + (ok ? "right" : "wrong");
      q.querySelector("details").open = true;
    };
    q.querySelector("button").addEventListener("click", check);
    answer.addEventListener("keydown", (e) => { if (e.key === "Enter") check(); });
  }
})();
