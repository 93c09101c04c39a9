"""A self-contained HTML page of per-token projections (``Readings.to_html()``, ``monitor --html``).

One file, no network: the readings travel as a JSON data block and a small inline script draws the
page from them (tokens shaded by projection, the per-block readings of a token on hover or click,
a token x block heatmap). Token text is model output, so it only ever reaches the page as JSON
with ``<``, ``>`` and ``&`` escaped, and the script inserts it with ``textContent``; the page's
Content-Security-Policy allows no network and only its own script (by hash), so even a mistake
there could not load or run anything else.

Colours (the script's ``colour``/``scale``, written out here because the tests check the pixels):
for one row, trait and block, ``x = (v - centre) / span`` where ``centre`` is the reading at the
row's last prompt token (or 0) and ``span`` the largest ``|v - centre|`` over the last prompt token
and the answer tokens (1 if that is 0). ``x`` is clipped to [-1, 1] and blends white towards
``HOT`` (x > 0) or ``COLD`` (x < 0) per channel, rounding halves up; no reading is ``NONE``.
"""
from __future__ import annotations

import base64
import hashlib
import html
import json
import math
from typing import Optional

COLD, HOT, NONE = (33, 102, 172), (178, 24, 43), (221, 221, 221)
DIGITS = 4  # significant digits of every reading in the page (and as it prints them)
REPR_VALUES = 300_000  # a notebook's inline page stops adding batch rows past this many readings


class HtmlPage(str):
    """The page's text; in a notebook it displays itself (in an iframe, so its script and styles
    stay inside it)."""

    def _repr_html_(self) -> str:
        return iframe(self)


def iframe(page: str, height: int = 720) -> str:
    return (f'<iframe srcdoc="{html.escape(page, quote=True)}" style="width:100%;height:{height}px;'
            f'border:1px solid #ddd" sandbox="allow-scripts"></iframe>')


def display_text(token: str) -> str:
    """What a token's box shows: a newline as a visible mark before the line break, an empty
    token as a visible mark."""
    if token == "":
        return "\u2205"
    return token.replace("\r", "\u240d").replace("\n", "\u23ce\n")


def _round(x: float) -> Optional[float]:
    return float(f"{x:.{DIGITS}g}") if math.isfinite(x) else None


def _row_tokens(readings, b, cols, tokens, tokenizer, ids) -> list[str]:
    T = readings.values.shape[1]
    if tokens is not None:
        seq = tokens[b]
        if len(seq) < T:
            raise ValueError(f"tokens[{b}] has {len(seq)} entries but the readings have {T} columns: give "
                             "one string per column of generate()'s output, left padding included")
        return [str(seq[c]) for c in cols]
    if ids is not None:
        seq = ids[b]
        if len(seq) < T:
            raise ValueError(f"ids[{b}] has {len(seq)} entries but the readings have {T} columns: pass "
                             "generate()'s output (left padding included)")
        return [tokenizer.decode([int(seq[c])]) for c in cols]
    return [f"#{c}" for c in cols]


def page_data(readings, tokens=None, *, tokenizer=None, ids=None, row=None, trait=None, layer=None,
              traits=None, layers=None, title=None, row_labels=None, max_values=None) -> dict:
    """What the page embeds (see :func:`page`): ``rows[k]`` has ``row`` (batch row), ``label``,
    ``cols`` (absolute columns shown: the valid ones), ``tokens``, ``prompt`` (how many of them are
    prompt tokens) and ``v``, the readings rounded to :data:`DIGITS` significant digits (None where
    there is none), flat with index ``(i * len(layers) + l) * len(traits) + m``."""
    B, T = readings.values.shape[:2]
    if (tokenizer is None) != (ids is None):
        raise ValueError("to decode the tokens give both tokenizer= and ids= (generate()'s output)")
    if tokens is not None and ids is not None:
        raise ValueError("give tokens= or tokenizer= with ids=, not both")
    if tokens is not None and len(tokens) and isinstance(tokens[0], str):
        if B != 1:
            raise ValueError(f"tokens is one list of strings but the readings have {B} rows: give one list per row")
        tokens = [tokens]
    for name, seq in (("tokens", tokens), ("ids", ids)):
        if seq is not None and len(seq) != B:
            raise ValueError(f"{name} has {len(seq)} rows but the readings have {B}")
    if row is not None and not -B <= row < B:
        raise IndexError(f"row {row} out of range: the readings have {B} rows")
    traits = list(traits) if traits is not None else list(readings.traits)
    layers = list(layers) if layers is not None else list(readings.layers)
    if not traits or not layers:
        raise ValueError("the page needs at least one trait and one layer")
    m_idx = [readings.trait_index(t) for t in traits]  # KeyError naming what was monitored
    l_idx = [readings.layer_index(l) for l in layers]
    trait = traits[0] if trait is None else trait
    layer = layers[len(layers) // 2] if layer is None else layer
    readings.trait_index(trait), readings.layer_index(layer)  # 'not monitored' comes first
    if trait not in traits:
        raise KeyError(f"trait {trait!r} is not among the page's traits {traits}")
    if layer not in layers:
        raise KeyError(f"layer {layer} is not among the page's layers {layers}")
    if row_labels is not None and len(row_labels) != B:
        raise ValueError(f"row_labels has {len(row_labels)} entries but the readings have {B} rows")
    sub = readings.values[:, :, l_idx][..., m_idx].double()
    rows, budget = [], max_values
    for b in ([row % B] if row is not None else range(B)):
        cols = readings.valid[b].nonzero().flatten().tolist()
        n_values = len(cols) * len(layers) * len(traits)
        if budget is not None and rows and n_values > budget:
            break
        budget = None if budget is None else budget - n_values
        start = int(readings.prompt_lengths[b])
        rows.append({"row": b, "label": str(row_labels[b]) if row_labels is not None else f"row {b}",
                     "cols": cols, "tokens": _row_tokens(readings, b, cols, tokens, tokenizer, ids),
                     "prompt": sum(c < start for c in cols),
                     "v": [_round(x) for x in sub[b, cols].flatten().tolist()]})
    return {"title": title or "per-token projections", "traits": traits, "layers": layers,
            "trait": traits.index(trait), "layer": layers.index(layer), "batch": B, "rows": rows}


def page(readings, tokens=None, **kw) -> HtmlPage:
    """The page of ``readings`` (:meth:`personakern.Readings.to_html` documents the arguments)."""
    data = page_data(readings, tokens, **kw)
    blob = json.dumps(data, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    # inside <script> only "</" could end the block; escaping every <, > and & keeps it plain JSON
    blob = blob.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    digest = base64.b64encode(hashlib.sha256(_SCRIPT.encode()).digest()).decode()
    title = html.escape(data["title"]).encode("ascii", "xmlcharrefreplace").decode()
    shown = len(data["rows"])
    more = (f" Rows 0-{shown - 1} of {data['batch']} shown; <code>to_html(row=...)</code> gives any one."
            if shown < data["batch"] and kw.get("row") is None else "")
    return HtmlPage(_TEMPLATE.format(csp=f"default-src 'none'; style-src 'unsafe-inline'; script-src 'sha256-{digest}'",
                                     title=title, css=_CSS, more=more, data=blob, script=_SCRIPT))


_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{css}</style></head>
<body>
<h1>{title}</h1>
<p class="pk-sub">Each token is shaded by its projection on the trait's persona vector at the chosen
block: red above, blue below the centre, full colour at the answer's largest distance from it.
Hover over a token for its reading at every block; click to pin it. Heatmap: one row per block,
each scaled on its own; click a cell to shade the tokens by that block.{more}</p>
<div class="pk-controls">
<label id="pk-row-box">row <select id="pk-row"></select></label>
<label>trait <select id="pk-trait"></select></label>
<label>block <select id="pk-layer"></select></label>
<label>centre <select id="pk-centre"><option value="prompt">last prompt token</option>
<option value="zero">0</option></select></label>
<span id="pk-legend"></span></div>
<div class="pk-main"><div id="pk-tokens"></div><div id="pk-detail"></div></div>
<h2>token &times; block</h2>
<div class="pk-heat-wrap"><canvas id="pk-heat"></canvas><div id="pk-heat-col"></div></div>
<p id="pk-stats" class="pk-sub"></p>
<noscript>This page draws itself with JavaScript.</noscript>
<script type="application/json" id="pk-data">{data}</script>
<script>{script}</script>
</body></html>
"""

_CSS = """
body{font:14px/1.45 system-ui,"DejaVu Sans",sans-serif;margin:16px 24px;color:#222;background:#fff}
h1{font-size:17px;margin:0 0 4px}h2{font-size:14px;margin:18px 0 6px}
.pk-sub{color:#666;margin:0 0 10px;font-size:12.5px;max-width:70em}
.pk-controls{display:flex;flex-wrap:wrap;gap:14px;align-items:center;margin:8px 0 12px;font-size:13px}
#pk-legend{font-size:12px;color:#444;min-width:36em}
.pk-swatch{display:inline-block;width:110px;height:10px;vertical-align:middle;margin:0 6px;
 border:1px solid #ccc;background:linear-gradient(90deg,rgb(33,102,172),#fff,rgb(178,24,43))}
.pk-main{display:grid;grid-template-columns:minmax(0,1fr) auto;gap:16px;align-items:start}
@media (max-width:900px){.pk-main{grid-template-columns:minmax(0,1fr)}}
#pk-tokens{font:13.5px/2.1 ui-monospace,"DejaVu Sans Mono",monospace;white-space:pre-wrap;
 word-break:break-word;border:1px solid #ddd;border-radius:6px;padding:8px 10px;height:420px;
 box-sizing:border-box;overflow:auto}
.pk-tok{padding:2px 0;margin-right:1px;border-radius:2px;cursor:pointer}
.pk-tok:hover{outline:1px solid #000}.pk-tok.pk-pinned{outline:2px solid #000}
.pk-prompt{opacity:.6;text-decoration:underline dashed #888}
.pk-mark{font:11px system-ui,sans-serif;color:#fff;background:#555;border-radius:3px;padding:1px 5px;margin:0 6px}
#pk-detail{box-sizing:border-box;height:420px;max-width:calc(100vw - 48px);font-size:12.5px;border:1px solid #ddd;
 border-radius:6px;padding:6px 10px;overflow:auto}
#pk-detail table{border-collapse:collapse;font:12px ui-monospace,"DejaVu Sans Mono",monospace}
#pk-detail th,#pk-detail td{padding:0 7px;text-align:right;font-weight:normal}
#pk-detail thead th{border-bottom:1px solid #ccc}#pk-detail .pk-cur th{font-weight:bold}
#pk-detail .pk-cur td{outline:1px solid #333}
.pk-heat-wrap{position:relative;overflow-x:auto}
#pk-heat-col{position:absolute;pointer-events:none;outline:1px solid #000;display:none}
"""

_SCRIPT = r"""
"use strict";
(function () {
const D = JSON.parse(document.getElementById("pk-data").textContent);
const L = D.layers.length, M = D.traits.length;
const COLD = [33, 102, 172], HOT = [178, 24, 43], NONE = [221, 221, 221];
const X0 = 64, Y0 = 4, CH = 12;
const $ = id => document.getElementById(id);
const S = {row: 0, trait: D.trait, layer: D.layer, centre: "prompt", pinned: null, hover: null, scales: []};

const val = (r, i, l, m) => r.v[(i * L + l) * M + m];
function fmt(v) {
  if (v === null) return "\u2014";
  const s = String(Number(v.toPrecision(4)));
  return v > 0 ? "+" + s : s;
}
function display(t) {
  return t === "" ? "\u2205" : t.replace(/\r/g, "\u240d").replace(/\n/g, "\u23ce\n");
}
function scale(r, l, m) {
  let c = 0, span = 0;
  if (S.centre === "prompt" && r.prompt > 0 && val(r, r.prompt - 1, l, m) !== null) c = val(r, r.prompt - 1, l, m);
  const from = r.prompt < r.tokens.length ? Math.max(r.prompt - 1, 0) : 0;
  for (let i = from; i < r.tokens.length; i++) {
    const v = val(r, i, l, m);
    if (v !== null) span = Math.max(span, Math.abs(v - c));
  }
  return [c, span || 1];
}
function colour(v, sc) {
  if (v === null) return NONE;
  const x = Math.max(-1, Math.min(1, (v - sc[0]) / sc[1])), a = Math.abs(x), end = x < 0 ? COLD : HOT;
  return end.map(e => Math.round(255 + a * (e - 255)));
}
const rgb = c => "rgb(" + c.join(",") + ")";
const ink = c => (c[0] * 0.3 + c[1] * 0.59 + c[2] * 0.11 < 140 ? "#fff" : "#000");
const row = () => D.rows[S.row];
const sc = (l, m) => S.scales[l * M + m];

function option(sel, text, value) {
  const o = document.createElement("option");
  o.textContent = text; o.value = value; sel.appendChild(o);
}
function rescale() {
  S.scales = [];
  for (let l = 0; l < L; l++) for (let m = 0; m < M; m++) S.scales.push(scale(row(), l, m));
}

function renderRow() {
  const r = row(), box = $("pk-tokens");
  box.textContent = "";
  r.tokens.forEach((t, i) => {
    if (i === r.prompt && i > 0) {
      const mark = document.createElement("span");
      mark.className = "pk-mark"; mark.textContent = "answer \u25b8"; box.appendChild(mark);
    }
    const s = document.createElement("span");
    s.className = "pk-tok" + (i < r.prompt ? " pk-prompt" : "");
    s.dataset.i = i; s.textContent = display(t);
    box.appendChild(s);
  });
  $("pk-stats").textContent = r.tokens.length + " tokens (" + r.prompt + " prompt, " + (r.tokens.length - r.prompt) +
    " answer) of batch row " + r.row + "; " + L + " blocks, " + M + " traits; each token's column in generate()'s output is in its tooltip.";
  shadeTokens(); drawHeat(); showDetail();
}

function shadeTokens() {
  const r = row(), l = S.layer, m = S.trait, s = sc(l, m);
  for (const el of $("pk-tokens").querySelectorAll(".pk-tok")) {
    const i = +el.dataset.i, v = val(r, i, l, m), c = colour(v, s);
    el.style.background = rgb(c); el.style.color = ink(c);
    el.dataset.v = fmt(v);
    el.title = "column " + r.cols[i] + " \u00b7 block " + D.layers[l] + " \u00b7 " + D.traits[m] + " " + fmt(v);
    el.classList.toggle("pk-pinned", i === S.pinned);
  }
  const lg = $("pk-legend");
  lg.textContent = "";
  lg.append(fmt(s[0] - s[1]));
  const sw = document.createElement("span"); sw.className = "pk-swatch"; lg.append(sw);
  lg.append(fmt(s[0] + s[1]) + "  (centre " + fmt(s[0]) + ", block " + D.layers[l] + ", " + D.traits[m] + ")");
}

function showDetail() {
  const r = row(), i = S.hover !== null ? S.hover : S.pinned, box = $("pk-detail");
  box.textContent = "";
  const col = $("pk-heat-col");
  if (i === null) {
    box.textContent = "Hover over a token (or click to pin it) to see its reading at every block.";
    col.style.display = "none";
    return;
  }
  const cv = $("pk-heat"), cw = +cv.dataset.cw;
  Object.assign(col.style, {display: "block", left: (X0 + i * cw) + "px", top: Y0 + "px", width: cw + "px", height: (L * CH) + "px"});
  const head = document.createElement("div");
  head.id = "pk-detail-head";
  head.textContent = "\u201c" + r.tokens[i] + "\u201d \u00b7 column " + r.cols[i] + " \u00b7 " +
    (i < r.prompt ? "prompt token " + (i + 1) : "answer token " + (i - r.prompt + 1));
  box.appendChild(head);
  box.dataset.i = i;
  const table = document.createElement("table"), thead = table.createTHead(), tr = thead.insertRow();
  const th0 = document.createElement("th"); th0.textContent = "block"; tr.appendChild(th0);
  D.traits.forEach(t => { const th = document.createElement("th"); th.textContent = t; tr.appendChild(th); });
  const body = table.createTBody();
  for (let l = 0; l < L; l++) {
    const row_ = body.insertRow(), th = document.createElement("th");
    row_.dataset.layer = D.layers[l];
    if (l === S.layer) row_.className = "pk-cur";
    th.textContent = D.layers[l]; row_.appendChild(th);
    for (let m = 0; m < M; m++) {
      const td = row_.insertCell(), v = val(r, i, l, m), c = colour(v, sc(l, m));
      td.textContent = fmt(v); td.style.background = rgb(c); td.style.color = ink(c);
    }
  }
  box.appendChild(table);
}

function drawHeat() {
  const r = row(), n = r.tokens.length, m = S.trait, cv = $("pk-heat");
  const cw = Math.max(2, Math.min(16, Math.floor(1000 / Math.max(n, 1))));
  cv.width = X0 + n * cw + 8; cv.height = Y0 + L * CH + 30;
  Object.assign(cv.dataset, {x0: X0, y0: Y0, cw: cw, ch: CH, blocks: L});
  const g = cv.getContext("2d");
  g.fillStyle = "#fff"; g.fillRect(0, 0, cv.width, cv.height);
  g.font = "10px sans-serif"; g.textAlign = "right"; g.textBaseline = "middle";
  for (let l = 0; l < L; l++) {
    g.fillStyle = l === S.layer ? "#000" : "#666";
    g.fillText((l === S.layer ? "\u25b8 " : "") + "block " + D.layers[l], X0 - 6, Y0 + l * CH + CH / 2);
    for (let i = 0; i < n; i++) {
      g.fillStyle = rgb(colour(val(r, i, l, m), sc(l, m)));
      g.fillRect(X0 + i * cw, Y0 + l * CH, cw, CH);
    }
  }
  const yb = Y0 + L * CH + 4;
  g.fillStyle = "#555"; g.textBaseline = "top";
  if (r.prompt > 0) { g.fillRect(X0, yb, r.prompt * cw, 2); g.textAlign = "left"; g.fillText("prompt", X0, yb + 5); }
  if (r.prompt < n) { g.fillStyle = "#b2182b"; g.fillRect(X0 + r.prompt * cw, yb, (n - r.prompt) * cw, 2);
    g.textAlign = "left"; g.fillText("answer (" + D.traits[m] + ")", X0 + r.prompt * cw + 2, yb + 5); }
}

function cell(e) {
  const cv = $("pk-heat"), box = cv.getBoundingClientRect(), cw = +cv.dataset.cw;
  const i = Math.floor((e.clientX - box.left - X0) / cw), l = Math.floor((e.clientY - box.top - Y0) / CH);
  return i >= 0 && i < row().tokens.length && l >= 0 && l < L ? [i, l] : null;
}
function pin(i) {
  S.pinned = S.pinned === i ? null : i;
  for (const el of $("pk-tokens").querySelectorAll(".pk-tok")) el.classList.toggle("pk-pinned", +el.dataset.i === S.pinned);
  showDetail();
}

function setup() {
  const rs = $("pk-row"), ts = $("pk-trait"), ls = $("pk-layer");
  // a fixed width (set by the number of traits): filling the detail must never reflow the tokens
  $("pk-detail").style.width = (90 + 84 * M) + "px";
  D.rows.forEach((r, k) => option(rs, r.label, k));
  if (D.rows.length < 2) $("pk-row-box").style.display = "none";
  D.traits.forEach((t, m) => option(ts, t, m));
  D.layers.forEach((l, k) => option(ls, String(l), k));
  ts.value = S.trait; ls.value = S.layer;
  rs.onchange = () => { S.row = +rs.value; S.pinned = S.hover = null; rescale(); renderRow(); };
  ts.onchange = () => { S.trait = +ts.value; shadeTokens(); drawHeat(); showDetail(); };
  ls.onchange = () => { S.layer = +ls.value; shadeTokens(); drawHeat(); showDetail(); };
  $("pk-centre").onchange = e => { S.centre = e.target.value; rescale(); shadeTokens(); drawHeat(); showDetail(); };
  const box = $("pk-tokens");
  box.addEventListener("mouseover", e => { const t = e.target.closest(".pk-tok"); if (t) { S.hover = +t.dataset.i; showDetail(); } });
  box.addEventListener("mouseleave", () => { S.hover = null; showDetail(); });
  box.addEventListener("click", e => { const t = e.target.closest(".pk-tok"); if (t) pin(+t.dataset.i); });
  const cv = $("pk-heat");
  cv.addEventListener("mousemove", e => { const c = cell(e); S.hover = c ? c[0] : null; showDetail(); });
  cv.addEventListener("mouseleave", () => { S.hover = null; showDetail(); });
  cv.addEventListener("click", e => {
    const c = cell(e);
    if (!c) return;
    S.layer = c[1]; ls.value = c[1]; S.pinned = null; S.hover = null; pin(c[0]); shadeTokens(); drawHeat();
  });
  if (!D.rows.length) { $("pk-tokens").textContent = "no rows"; return; }
  rescale(); renderRow();
  document.body.dataset.ready = "1";
}
setup();
})();
"""
