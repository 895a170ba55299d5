"""circuit.html: a finished run's circuit as one self-contained page to open in a browser.

The page needs no network: the run's data is embedded as JSON in a ``<script type="application/json">`` tag
and drawn by inline vanilla JavaScript and CSS (no scripts, styles or fonts from elsewhere). It shows the
layers as rows with their layer and attention gates, heads and MLP as cells (green when kept, grey when
closed, the green darker the higher the node's deterministic gate), the circuit's counts per granularity,
the held-out metrics and the faithfulness curve. A click on a head or an MLP cell (or a URL fragment such as
``circuit.html#node=head-1-3`` or ``#node=mlp-0``) shows that node's neuron-level kept set and a histogram of its
neurons' gate values.

Element ids the page gives (stable, for tests and for links): ``count-<granularity>`` (a row with
``data-kept`` / ``data-total``; its ``.kept`` and ``.total`` cells show them), ``head-<layer>-<head>``,
``mlp-<layer>``, ``layer-<layer>``, ``attn-<layer>`` (cells with ``data-kept`` and ``data-gate``), ``detail``
(the panel; one ``[data-granularity]`` section per neuron level with ``.kept`` / ``.total``), ``metric-<key>``,
``curve``.
"""
from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

import numpy as np
import torch

from ..model.masks import gate_shapes
from ..ops.hard_concrete.reference import hard_concrete_reference
from .evaluate import nodes_kept
from .outputs import _atomic, load_gates
from .report import read_run, run_file

HTML_NAME = "circuit.html"
HIST_BINS = 20  # gate-value histogram bins over [0, 1]


def write_html(run_dir) -> Path:
    """Write ``<run_dir>/circuit.html``, the run's interactive circuit viewer, and return its path.

    Reads the finished run's circuit.json, metrics.json (metrics and faithfulness curve), config.json and
    gates.safetensors (log_alpha per granularity, float32, shaped as in :class:`NodeMasks`). Gate values
    shown are the deterministic (evaluation) gates ``clamp(sigmoid(log_alpha) * 1.2 - 0.1, 0, 1)``, the
    values ``NodeMasks.deterministic_gates`` gives (a threshold circuit keeps the nodes whose gate exceeds it).

    Raises:
        FileNotFoundError: ``run_dir`` is not a finished run (no circuit.json, metrics.json, config.json,
            history.json or gates.safetensors).
        ValueError: a file is unreadable or its gates do not fit the circuit.
    """
    run_dir = Path(run_dir)
    data = _page_data(run_dir)
    text = json.dumps(_json_safe(data), allow_nan=False, separators=(",", ":"))
    # "<", ">" and "&" escaped as JSON string escapes: "</script>" or "<!--" in a task name cannot end the tag
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    title = html.escape(f"circuit: {data['run']['task'] or 'a task'} on {data['model_type'] or 'a model'}")
    page = _PAGE.replace("__TITLE__", title).replace("__STYLE__", _STYLE).replace("__SCRIPT__", _SCRIPT)
    page = page.replace("__DATA__", text)  # last: the data may contain the other markers
    path = run_dir / HTML_NAME
    _atomic(path, lambda p: p.write_text(page, encoding="utf-8"))
    return path


def _read_gates(run_dir: Path, circuit) -> dict:
    """{granularity: deterministic gate values (float32, log_alpha's shape)}, checked against the circuit."""
    path = run_file(run_dir, "gates.safetensors")
    try:
        log_alpha = load_gates(path)
    except Exception as e:  # safetensors raises its own error types for a truncated or foreign file
        raise ValueError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e}); rerun the command "
                         "that wrote it") from None
    if set(log_alpha) != set(circuit.kept):
        raise ValueError(f"{path} has gates for {', '.join(sorted(log_alpha)) or 'nothing'} but circuit.json gates "
                         f"{', '.join(circuit.kept)}: the two files are from different runs")
    shapes = gate_shapes(circuit.dims)
    for g in circuit.kept:  # canonical order
        if tuple(log_alpha[g].shape) != shapes[g]:
            raise ValueError(f"{path}: {g} has shape {list(log_alpha[g].shape)}, the circuit's model needs "
                             f"{list(shapes[g])}: the two files are from different runs")
    return {g: hard_concrete_reference(log_alpha[g].float(), training=False) for g in circuit.kept}


def _bits(kept: torch.Tensor) -> str:
    """A bool vector packed 8 to a byte, first element in the high bit, as base64."""
    return base64.b64encode(np.packbits(kept.numpy().astype(np.uint8)).tobytes()).decode("ascii")


def _neurons(full: dict, gates: dict, g: str, layer: int, cols: slice) -> dict:
    kept = full[g][layer, cols]
    hist = None
    if g in gates:
        hist = torch.histc(gates[g][layer, cols], bins=HIST_BINS, min=0.0, max=1.0).long().tolist()
    return {"granularity": g, "kept": int(kept.sum()), "total": kept.numel(), "bits": _bits(kept), "hist": hist}


def _node(full: dict, gates: dict, g: str, index: tuple) -> dict:
    return {"kept": bool(full[g][index]), "gate": float(gates[g][index]) if g in gates else None}


def _page_data(run_dir: Path) -> dict:
    """Everything the page shows, as plain JSON-able values."""
    run = read_run(run_dir)
    circuit = run["circuit"]
    gates = _read_gates(run_dir, circuit)
    full, d = circuit.full(), circuit.dims
    D = d.head_dim
    layers = []
    for layer in range(d.n_layers):
        heads = [dict(_node(full, gates, "head", (layer, h)),
                      neurons=[_neurons(full, gates, "attn_neuron", layer, slice(h * D, (h + 1) * D))])
                 for h in range(d.n_heads)]
        mlp = dict(_node(full, gates, "mlp", (layer,)),
                   neurons=[_neurons(full, gates, g, layer, slice(None)) for g in ("mlp_neuron", "mlp_out")])
        layers.append({"layer": _node(full, gates, "layer", (layer,)), "attn": _node(full, gates, "attn", (layer,)),
                       "heads": heads, "mlp": mlp})
    cfg = run["config"]
    return {
        "run": {"dir": str(run_dir), "task": cfg.get("task"), "n_train": cfg.get("n_train"),
                "n_eval": cfg.get("n_eval"), "config": cfg.get("config", {})},
        "model_type": circuit.model_type, "dims": d.to_dict(), "threshold": circuit.threshold,
        "gated": list(circuit.kept), "hist_bins": HIST_BINS,
        "counts": {g: {"kept": k, "total": n, "fraction": f} for g, (k, n, f) in circuit.counts().items()},
        "nodes_kept": nodes_kept(circuit), "metrics": run["metrics"],
        "curve": [{k: p.get(k) for k in ("nodes_kept", "kl", "accuracy", "tau")} for p in run["curve"]],
        "layers": layers,
    }


def _json_safe(obj):
    """Non-finite floats as the strings "nan", "inf", "-inf" (JSON has no such numbers)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>__TITLE__</title>
<style>__STYLE__</style>
</head>
<body>
<header id="header"><h1 id="title"></h1><p id="subtitle"></p></header>
<main>
<section class="card" id="circuit-card">
  <h2>Circuit <span class="hint">click a head or an MLP for its neurons</span></h2>
  <div class="circuit-wrap">
    <div class="grid-scroll"><table id="grid"></table><div id="legend"></div><p id="reading" class="note"></p></div>
    <aside id="detail"><p class="placeholder">Click a head or an MLP cell to see which of its neurons the circuit
    keeps and how their gates are spread.</p></aside>
  </div>
</section>
<div class="row">
  <section class="card"><h2>Kept per granularity</h2><table id="counts" class="data"></table>
    <p class="note">* implied by the gated granularities (not gated itself).</p></section>
  <section class="card"><h2>Held-out metrics</h2><table id="metrics" class="data"></table></section>
</div>
<section class="card"><h2>Faithfulness against sparsity <span class="hint">held-out examples</span></h2>
  <div id="curve"></div></section>
<section class="card"><details><summary>All options of the run</summary><pre id="options"></pre></details></section>
</main>
<script type="application/json" id="run-data">__DATA__</script>
<script>__SCRIPT__</script>
</body>
</html>
"""

_STYLE = """
:root { --kept: #2e8b57; --closed: #d9dcdf; --ink: #1f2933; --muted: #66727f; --line: #e3e6ea; --bg: #f5f6f8; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink);
       font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
header { padding: 18px 28px 6px; }
h1 { font-size: 21px; margin: 0 0 4px; font-weight: 600; }
h2 { font-size: 15px; margin: 0 0 12px; font-weight: 600; }
#subtitle { margin: 0; color: var(--muted); }
main { padding: 8px 28px 28px; max-width: 1280px; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 16px 18px; margin: 0 0 16px; }
.row { display: flex; gap: 16px; flex-wrap: wrap; align-items: flex-start; }
.row > .card { flex: 1 1 360px; }
.hint { font-weight: 400; color: var(--muted); font-size: 13px; margin-left: 8px; }
.circuit-wrap { display: flex; gap: 22px; align-items: flex-start; flex-wrap: wrap; }
.grid-scroll { overflow-x: auto; max-width: 100%; }
#grid { border-collapse: separate; border-spacing: 3px; }
#grid th { font-weight: 500; color: var(--muted); font-size: 12px; padding: 0 2px; white-space: nowrap; }
#grid th.rowhead { text-align: right; padding-right: 8px; }
#grid td.sep { width: 10px; }
.node { width: 46px; height: 38px; border-radius: 5px; text-align: center; vertical-align: middle; position: relative;
        font-size: 12px; font-variant-numeric: tabular-nums; border: 1px solid transparent; }
.node.closed { background: var(--closed); color: var(--muted); border: 1px dashed #b7bdc4; }
.node.small { width: 40px; }
.node.mlp { width: 64px; }
.node.clickable { cursor: pointer; }
.node.clickable:hover, .node.clickable:focus { outline: 2px solid #5b7fa6; outline-offset: 1px; }
.node.selected { outline: 3px solid #1f4e79 !important; outline-offset: 1px; }
.node .bar { position: absolute; left: 4px; right: 4px; bottom: 3px; height: 3px; background: rgba(0,0,0,.12);
             border-radius: 2px; }
.node .bar > i { display: block; height: 100%; background: rgba(255,255,255,.9); border-radius: 2px; }
.node.closed .bar > i { background: #9aa3ac; }
.node .label { display: block; font-size: 10px; opacity: .85; line-height: 1; margin-top: -2px; }
#reading { max-width: 520px; margin: 14px 3px 0; }
#legend { display: flex; gap: 16px; flex-wrap: wrap; margin: 10px 3px 0; color: var(--muted); font-size: 12px;
          align-items: center; }
#legend .swatch { display: inline-block; width: 14px; height: 14px; border-radius: 3px; vertical-align: -3px;
                  margin-right: 5px; }
#legend .ramp { display: inline-block; width: 90px; height: 10px; border-radius: 3px; vertical-align: -1px;
                margin: 0 5px; }
#detail { flex: 1 1 340px; min-width: 300px; max-width: 560px; border-left: 3px solid var(--line);
          padding: 2px 0 2px 16px; }
#detail .placeholder { color: var(--muted); margin: 4px 0; }
#detail h3 { font-size: 15px; margin: 0 0 2px; }
#detail .status { color: var(--muted); margin: 0 0 10px; }
#detail section { margin: 0 0 14px; }
#detail h4 { font-size: 13px; margin: 0 0 4px; font-weight: 600; }
#detail .count { font-size: 13px; margin: 0 0 6px; }
#detail canvas { display: block; margin: 0 0 6px; }
#detail .note { margin: 2px 0; }
.note { color: var(--muted); font-size: 12px; }
table.data { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
table.data th, table.data td { padding: 5px 8px; border-bottom: 1px solid var(--line); text-align: right; }
table.data th:first-child, table.data td:first-child { text-align: left; }
table.data th { font-weight: 500; color: var(--muted); font-size: 12px; }
table.data td.pct { width: 34%; }
.pctbar { display: inline-block; width: 70px; height: 8px; background: var(--closed); border-radius: 4px;
          margin-left: 8px; vertical-align: 0; overflow: hidden; }
.pctbar > i { display: block; height: 100%; background: var(--kept); }
tr.implied td:first-child { color: var(--muted); }
svg text { font: 11px system-ui, -apple-system, "Segoe UI", Roboto, Arial, sans-serif; fill: var(--muted); }
#curve { display: flex; gap: 28px; flex-wrap: wrap; align-items: flex-start; }
#curve-table { width: auto; min-width: 260px; }
.curve-legend { display: flex; gap: 14px; flex-wrap: wrap; align-items: center; margin: 4px 0 0 56px; }
.curve-legend .swatch { display: inline-block; width: 20px; height: 3px; margin-right: 6px; vertical-align: 3px; }
.curve-legend .swatch.dashed {
  background: repeating-linear-gradient(90deg, #d9822b 0 5px, transparent 5px 8px) !important; }
pre { font-size: 12px; margin: 8px 0 0; white-space: pre-wrap; }
summary { cursor: pointer; font-weight: 600; }
"""

_SCRIPT = r"""
"use strict";
const DATA = JSON.parse(document.getElementById("run-data").textContent);
const NS = "http://www.w3.org/2000/svg";  // the SVG namespace name (nothing is fetched)
const KEPT = "#2e8b57", CLOSED = "#d9dcdf";

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else if (k === "text") e.textContent = v; else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
}
function svgEl(tag, attrs, text) {
  const e = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}
function num(v, digits) {
  if (v === null || v === undefined) return "\u2013";
  if (typeof v === "string") return v;  // "nan", "inf"
  if (typeof v === "boolean") return v ? "yes" : "no";
  return digits === undefined ? String(v) : v.toFixed(digits);
}
function pct(f) { return (100 * f).toFixed(1) + "%"; }
function unpack(b64, n) {
  const bytes = atob(b64), out = new Uint8Array(n);
  for (let i = 0; i < n; i++) out[i] = (bytes.charCodeAt(i >> 3) >> (7 - (i & 7))) & 1;
  return out;
}
// kept nodes are green, darker the higher their gate; closed ones grey (CSS)
function keptColour(gate) {
  const g = gate === null ? 1 : Math.max(0, Math.min(1, gate));
  return "hsl(146, 50%, " + (72 - 40 * g).toFixed(1) + "%)";
}

// ------------------------------------------------------------------------------------ header
function header() {
  const d = DATA.dims, r = DATA.run, c = r.config || {};
  document.getElementById("title").textContent =
    "Circuit of a " + (DATA.model_type || "") + " model on " + (r.task || "its task");
  const parts = [d.n_layers + " layers, " + d.n_heads + " heads of " + d.head_dim + ", d_model " + d.d_model +
                 ", d_ff " + d.d_ff,
                 r.n_train + " train / " + r.n_eval + " held-out examples"];
  if (c.ablation) parts.push(c.ablation + " ablation");
  if (c.objective) parts.push(c.objective + " objective");
  if (c.steps) parts.push(c.steps + " steps");
  parts.push(DATA.threshold === null ? "cut by expected zeros" : "gates cut at " + DATA.threshold);
  document.getElementById("subtitle").textContent = parts.join(" \u00b7 ") + " \u00b7 " + r.dir;
  document.getElementById("options").textContent = JSON.stringify(c, null, 2);
}

// ------------------------------------------------------------------------------------ the grid
const NODES = {};  // id -> {title, kept, gate, granularity, neurons}

function cell(id, node, cls, label, gran, title, fraction) {
  const td = el("td", {id: id, class: "node " + cls + (node.kept ? " kept" : " closed"),
                       "data-kept": node.kept ? "1" : "0", "data-gate": node.gate === null ? "" : String(node.gate)});
  if (node.kept) {
    td.style.background = keptColour(node.gate);
    td.style.color = (node.gate === null || node.gate > 0.55) ? "#fff" : "#123";
  }
  td.append(el("span", {text: node.gate === null ? (node.kept ? "kept" : "off") : node.gate.toFixed(2)}));
  if (label) td.append(el("span", {class: "label", text: label}));
  if (fraction !== undefined) {
    const bar = el("span", {class: "bar"}), fill = el("i");
    fill.style.width = (100 * fraction).toFixed(1) + "%";
    bar.append(fill);
    td.append(bar);
  }
  td.title = title + ": " + (node.kept ? "kept" : "closed") + ", " +
             (node.gate === null ? gran + " not gated" : "gate " + node.gate.toFixed(3));
  if (node.neurons) {
    td.classList.add("clickable");
    td.tabIndex = 0;
    td.setAttribute("role", "button");
    NODES[id] = {title: title, kept: node.kept, gate: node.gate, granularity: gran, neurons: node.neurons};
    td.addEventListener("click", () => select(id));
    td.addEventListener("keydown", (e) => {
      if (e.key === "Enter" || e.key === " ") { e.preventDefault(); select(id); }
    });
  }
  return td;
}

function grid() {
  const table = document.getElementById("grid"), H = DATA.dims.n_heads;
  const head = el("tr", {}, el("th"), el("th", {text: "layer"}), el("th", {text: "attn"}), el("td", {class: "sep"}));
  for (let h = 0; h < H; h++) head.append(el("th", {text: "H" + h}));
  head.append(el("td", {class: "sep"}), el("th", {text: "MLP"}));
  table.append(el("thead", {}, head));
  const body = el("tbody");
  DATA.layers.forEach((L, i) => {
    const tr = el("tr", {}, el("th", {class: "rowhead", text: "L" + i}));
    tr.append(cell("layer-" + i, L.layer, "small", "", "layer", "layer " + i));
    tr.append(cell("attn-" + i, L.attn, "small", "", "attn", "layer " + i + " attention"));
    tr.append(el("td", {class: "sep"}));
    L.heads.forEach((hd, h) => {
      const n = hd.neurons[0];
      tr.append(cell("head-" + i + "-" + h, hd, "head", "", "head", "layer " + i + ", head " + h, n.kept / n.total));
    });
    tr.append(el("td", {class: "sep"}));
    const m = L.mlp.neurons[0];
    tr.append(cell("mlp-" + i, L.mlp, "mlp", "MLP", "mlp", "layer " + i + " MLP", m.kept / m.total));
    body.append(tr);
  });
  table.append(body);
  const legend = document.getElementById("legend");
  const ramp = el("span", {class: "ramp"});
  ramp.style.background = "linear-gradient(90deg, " + keptColour(0) + ", " + keptColour(1) + ")";
  const closed = el("span", {class: "swatch"});
  closed.style.background = CLOSED;
  closed.style.border = "1px dashed #b7bdc4";
  legend.append(el("span", {}, "kept, gate 0", ramp, "1"), el("span", {}, closed, "closed"),
                el("span", {text: "cell text: the node's deterministic gate; bar: its neurons kept"}));
  document.getElementById("reading").textContent = "Each row is a decoder layer: its layer gate, its attention " +
    "block's gate, its " + H + " heads and its MLP. The circuit is consistent: a closed node closes every " +
    "node below it, and a node with nothing kept below it is closed (an MLP: no hidden unit or no output " +
    "feature kept). A head's neurons are its " + DATA.dims.head_dim + " attention output features " +
    "(attn_neuron); an MLP's are its " + DATA.dims.d_ff + " hidden units (mlp_neuron) and its " +
    DATA.dims.d_model + " output features (mlp_out).";
}

// ------------------------------------------------------------------------------------ the detail panel
function keptSet(bits, n, width) {
  // one square per neuron, in rows filling the panel's width: about 120 px of rows, squares 2 to 14 px
  const size = Math.max(2, Math.min(14, Math.floor(Math.sqrt(width * 120 / n))));
  const cols = Math.min(n, Math.floor(width / size)), rows = Math.ceil(n / cols);
  const ratio = window.devicePixelRatio || 1;
  const canvas = el("canvas", {"aria-label": "kept neurons"});
  canvas.width = cols * size * ratio;
  canvas.height = rows * size * ratio;
  canvas.style.width = cols * size + "px";
  canvas.style.height = rows * size + "px";
  const ctx = canvas.getContext("2d");
  ctx.scale(ratio, ratio);
  const gap = size >= 6 ? 1 : 0;
  for (let i = 0; i < n; i++) {
    ctx.fillStyle = bits[i] ? KEPT : CLOSED;
    ctx.fillRect((i % cols) * size, Math.floor(i / cols) * size, size - gap, size - gap);
  }
  return canvas;
}

function histogram(hist) {
  const W = 340, Hh = 120, m = {l: 34, r: 8, t: 8, b: 24}, bins = hist.length;
  const s = svgEl("svg", {width: W, height: Hh, viewBox: "0 0 " + W + " " + Hh, class: "hist"});
  const top = Math.max(1, ...hist), bw = (W - m.l - m.r) / bins, ph = Hh - m.t - m.b;
  const thr = DATA.threshold;
  hist.forEach((c, b) => {
    const h = ph * c / top, mid = (b + 0.5) / bins;
    const r = svgEl("rect", {x: m.l + b * bw + 0.5, y: m.t + ph - h, width: Math.max(1, bw - 1), height: h,
                             fill: thr === null || mid > thr ? KEPT : "#9aa3ac"});
    r.append(svgEl("title", {}, c + " neurons with gate in [" + (b / bins).toFixed(2) + ", " +
                                ((b + 1) / bins).toFixed(2) + (b + 1 === bins ? "]" : ")")));
    s.append(r);
  });
  s.append(svgEl("line", {x1: m.l, x2: W - m.r, y1: m.t + ph, y2: m.t + ph, stroke: "#9aa3ac"}));
  [0, 0.5, 1].forEach(v => s.append(svgEl("text", {x: m.l + v * (W - m.l - m.r), y: Hh - 8,
                                                   "text-anchor": "middle"}, String(v))));
  s.append(svgEl("text", {x: m.l - 4, y: m.t + 9, "text-anchor": "end"}, String(top)));
  s.append(svgEl("text", {x: m.l - 4, y: m.t + ph, "text-anchor": "end"}, "0"));
  if (thr !== null) {
    const x = m.l + thr * (W - m.l - m.r);
    s.append(svgEl("line", {x1: x, x2: x, y1: m.t, y2: m.t + ph, stroke: "#1f4e79", "stroke-dasharray": "3 3"}));
  }
  return s;
}

function select(id) {
  const node = NODES[id];
  if (!node) return;
  document.querySelectorAll(".node.selected").forEach(e => e.classList.remove("selected"));
  document.getElementById(id).classList.add("selected");
  const panel = document.getElementById("detail");
  panel.replaceChildren();
  panel.dataset.node = id;
  panel.append(el("h3", {id: "detail-title", text: node.title.charAt(0).toUpperCase() + node.title.slice(1)}));
  panel.append(el("p", {class: "status", text: (node.kept ? "kept" : "closed") + " \u00b7 " +
    (node.gate === null ? node.granularity + " not gated" : "gate " + node.gate.toFixed(3))}));
  for (const n of node.neurons) {
    const sec = el("section", {"data-granularity": n.granularity});
    sec.append(el("h4", {text: n.granularity}));
    sec.append(el("p", {class: "count"}, el("span", {class: "kept", text: String(n.kept)}), " of ",
                  el("span", {class: "total", text: String(n.total)}), " kept (" + pct(n.kept / n.total) + ")"));
    sec.append(keptSet(unpack(n.bits, n.total), n.total, Math.max(200, panel.clientWidth - 24)));
    if (n.hist) {
      sec.append(el("p", {class: "note", text: "deterministic gate values of these " + n.total + " neurons" +
                          (DATA.threshold === null ? "" : " (dashed: the threshold " + DATA.threshold + ")")}));
      sec.append(histogram(n.hist));
    } else {
      sec.append(el("p", {class: "note", text: n.granularity + " is not gated in this run: its neurons follow " +
                          "the node above"}));
    }
    panel.append(sec);
  }
  if (location.hash !== "#node=" + id) history.replaceState(null, "", "#node=" + id);
}

// ------------------------------------------------------------------------------------ tables
function counts() {
  const t = document.getElementById("counts");
  t.append(el("tr", {}, el("th", {text: "granularity"}), el("th", {text: "kept"}), el("th", {text: "total"}),
                       el("th", {text: "kept %"})));
  for (const [g, c] of Object.entries(DATA.counts)) {
    const gated = DATA.gated.includes(g), bar = el("span", {class: "pctbar"}), fill = el("i");
    fill.style.width = pct(c.fraction);
    bar.append(fill);
    t.append(el("tr", {id: "count-" + g, class: gated ? "gated" : "implied", "data-kept": String(c.kept),
                       "data-total": String(c.total)},
                el("td", {text: g + (gated ? "" : " *")}), el("td", {class: "kept", text: String(c.kept)}),
                el("td", {class: "total", text: String(c.total)}), el("td", {class: "pct"}, pct(c.fraction), bar)));
  }
}

const METRIC_NAMES = {kl: "KL to the full model", accuracy: "accuracy", full_accuracy: "full model's accuracy",
  exact_match: "argmax matches the full model", logit_diff: "logit difference",
  full_logit_diff: "full model's logit difference", prob_diff: "probability difference",
  full_prob_diff: "full model's probability difference", n_examples: "held-out examples"};
const TRAIN_NAMES = {"train/loss": "loss", "train/objective": "objective",
  "train/sparsity/mean": "mean expected sparsity"};

function metrics() {
  const t = document.getElementById("metrics"), m = DATA.metrics;
  t.append(el("tr", {}, el("th", {text: "metric"}), el("th", {text: "value"})));
  const row = (k, name) => t.append(el("tr", {id: "metric-" + k.replace(/[^A-Za-z0-9_-]/g, "_")},
    el("td", {text: name}), el("td", {text: k === "n_examples" ? num(m[k]) : num(m[k], 4)})));
  for (const k of Object.keys(METRIC_NAMES)) if (k in m) row(k, METRIC_NAMES[k]);
  const train = Object.keys(TRAIN_NAMES).filter(k => k in m);
  if (train.length) {
    t.append(el("tr", {}, el("th", {text: "at the last training step"}), el("th")));
    for (const k of train) row(k, TRAIN_NAMES[k]);
  }
}

// ------------------------------------------------------------------------------------ the curve
function curve() {
  const pts = DATA.curve.filter(p => typeof p.nodes_kept === "number").sort((a, b) => a.nodes_kept - b.nodes_kept);
  const box = document.getElementById("curve");
  const W = 640, H = 280, m = {l: 56, r: 60, t: 14, b: 42};
  const s = svgEl("svg", {width: W, height: H, viewBox: "0 0 " + W + " " + H, "aria-label": "faithfulness curve"});
  const pw = W - m.l - m.r, ph = H - m.t - m.b;
  const kls = pts.map(p => p.kl).filter(v => typeof v === "number");
  const klTop = Math.max(1e-6, ...kls) * 1.1;
  const X = v => m.l + v * pw, YK = v => m.t + ph - ph * v / klTop, YA = v => m.t + ph - ph * v;
  s.append(svgEl("rect", {x: m.l, y: m.t, width: pw, height: ph, fill: "none", stroke: "#e3e6ea"}));
  for (let i = 0; i <= 4; i++) {
    const f = i / 4, y = m.t + ph - ph * f;
    s.append(svgEl("line", {x1: m.l, x2: m.l + pw, y1: y, y2: y, stroke: "#f0f1f3"}));
    s.append(svgEl("text", {x: m.l - 6, y: y + 4, "text-anchor": "end"}, (klTop * f).toPrecision(2)));
    s.append(svgEl("text", {x: m.l + pw + 6, y: y + 4}, f.toFixed(2)));
    s.append(svgEl("text", {x: X(f), y: m.t + ph + 16, "text-anchor": "middle"}, pct(f).replace(".0", "")));
  }
  s.append(svgEl("text", {x: m.l + pw / 2, y: H - 6, "text-anchor": "middle"}, "gated nodes kept"));
  s.append(svgEl("text", {x: 14, y: m.t + ph / 2, "text-anchor": "middle",
                          transform: "rotate(-90 14 " + (m.t + ph / 2) + ")", fill: "#1f4e79"}, "KL"));
  s.append(svgEl("text", {x: W - 12, y: m.t + ph / 2, "text-anchor": "middle",
                          transform: "rotate(90 " + (W - 12) + " " + (m.t + ph / 2) + ")", fill: "#d9822b"},
                         "accuracy"));
  const cx = X(DATA.nodes_kept);
  s.append(svgEl("line", {x1: cx, x2: cx, y1: m.t, y2: m.t + ph, stroke: "#9aa3ac", "stroke-dasharray": "4 3"}));
  s.append(svgEl("text", {x: cx + 4, y: m.t + ph / 2}, "the circuit"));
  const series = [["kl", YK, "#1f4e79", "circle"], ["accuracy", YA, "#d9822b", "rect"]];
  for (const [key, Y, colour, shape] of series) {
    const ok = pts.filter(p => typeof p[key] === "number");
    s.append(svgEl("polyline", {points: ok.map(p => X(p.nodes_kept) + "," + Y(p[key])).join(" "), fill: "none",
                                stroke: colour, "stroke-width": 2, "stroke-dasharray": key === "kl" ? "" : "5 3"}));
    for (const p of ok) {
      const mark = shape === "circle"
        ? svgEl("circle", {cx: X(p.nodes_kept), cy: Y(p[key]), r: 4, fill: colour})
        : svgEl("rect", {x: X(p.nodes_kept) - 3.5, y: Y(p[key]) - 3.5, width: 7, height: 7, fill: colour});
      mark.append(svgEl("title", {}, pct(p.nodes_kept) + " kept: KL " + num(p.kl, 4) + ", accuracy " +
                                     num(p.accuracy, 3)));
      s.append(mark);
    }
  }
  const legend = el("p", {class: "note curve-legend"});
  for (const [key, , colour] of series) {
    const mark = el("span", {class: "swatch"});
    mark.style.background = colour;
    if (key !== "kl") mark.classList.add("dashed");
    legend.append(el("span", {}, mark, key === "kl" ? "KL to the full model (left axis)" : "accuracy (right axis)"));
  }
  legend.append(el("span", {text: "grey dashes: the circuit, " + pct(DATA.nodes_kept) + " of the gated nodes kept"}));
  const table = el("table", {class: "data", id: "curve-table"},
                   el("tr", {}, el("th", {text: "nodes kept"}), el("th", {text: "KL"}), el("th", {text: "accuracy"})));
  for (const p of pts.slice().reverse())
    table.append(el("tr", {}, el("td", {text: pct(p.nodes_kept)}), el("td", {text: num(p.kl, 4)}),
                    el("td", {text: num(p.accuracy, 3)})));
  box.append(el("div", {class: "curve-plot"}, s, legend), table);
}

header();
grid();
counts();
metrics();
curve();
const start = location.hash.match(/^#node=(.+)$/);  // a link to a node: circuit.html#node=head-1-3
if (start && NODES[start[1]]) select(start[1]);
"""
