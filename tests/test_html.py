"""The HTML page of per-token readings: what it embeds equals ``Readings.values``, model output
cannot inject markup, and in a real headless Chromium every token shows its reading, hover and click
show the readings at every block, and the heatmap's pixels have the documented colours."""
from __future__ import annotations

import base64
import hashlib
import html
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from browser import Chromium, find_chromium
from personakern import Readings
from personakern.monitoring.html import COLD, HOT, NONE, display_text, page_data

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = find_chromium()
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (apt-get install chromium); "
                                                              ".ci/run installs it")
EVIL = ["<script>window.pwned=1</script>", "&amp;", "<img src=x onerror=\"window.pwned=2\">", "'\"", "</script>"]


def awkward_readings(seed=0, answer=12):
    """2 rows (row 0 left-padded by 3), 30 layers, 3 traits, magnitudes from 1e-3 to 1e3 by layer,
    one valid token with no reading at one layer (NaN), and token text that tries to inject markup."""
    g = torch.Generator().manual_seed(seed)
    prompt, B, L, M = 6, 2, 30, 3
    T = prompt + answer
    scale = torch.logspace(-3, 3, L)[None, None, :, None]
    values = torch.randn(B, T, L, M, generator=g) * scale
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[0, :3] = False
    values[0, :3] = float("nan")
    values[1, prompt + 2, 7, 1] = float("nan")
    tokens = [[f"t{b}.{t}" for t in range(T + 1)] for b in range(B)]
    for k, s in enumerate(EVIL + ["\n", "", " spaced", "é€"]):
        tokens[k % 2][4 + k] = s
    r = Readings(values, valid, list(range(L)), ["evil", "humorous", "sycophantic"], torch.tensor([prompt, prompt - 1]))
    return r, tokens


def round4(x):
    return float(f"{x:.4g}") if math.isfinite(x) else None


def page_json(text):
    return json.loads(re.search(r'<script type="application/json" id="pk-data">(.*?)</script>', text, re.S).group(1))


def expected_colours(r, b, cols, prompt, m, centre="prompt"):
    """``[layer][token]``: the colours the docstring of personakern.monitoring.html promises,
    computed from Readings.values."""
    out = []
    for l in range(len(r.layers)):
        v = [round4(x) for x in r.values[b, cols, l, m].double().tolist()]
        c = v[prompt - 1] if centre == "prompt" and prompt > 0 and v[prompt - 1] is not None else 0.0
        scope = v[max(prompt - 1, 0):] if prompt < len(v) else v
        span = max((abs(x - c) for x in scope if x is not None), default=0.0) or 1.0
        row = []
        for x in v:
            if x is None:
                row.append(NONE)
                continue
            x = max(-1.0, min(1.0, (x - c) / span))
            row.append(tuple(math.floor(255 + abs(x) * (e - 255) + 0.5) for e in (COLD if x < 0 else HOT)))
        out.append(row)
    return out


def test_page_data_holds_the_readings():
    r, tokens = awkward_readings()
    d = page_data(r, tokens, trait="humorous", layer=7)
    assert d["traits"] == r.traits and d["layers"] == list(range(30)) and (d["trait"], d["layer"]) == (1, 7)
    assert [row["row"] for row in d["rows"]] == [0, 1]
    for row in d["rows"]:
        b = row["row"]
        assert row["cols"] == r.valid[b].nonzero().flatten().tolist()
        assert row["tokens"] == [tokens[b][c] for c in row["cols"]]
        assert row["prompt"] == int(r.prompt_lengths[b]) - (3 if b == 0 else 0)
        expect = [round4(x) for x in r.values[b, row["cols"]].flatten().double().tolist()]
        assert row["v"] == expect
    assert d["rows"][1]["v"][((6 + 2) * 30 + 7) * 3 + 1] is None  # the NaN reading
    one = page_data(r, tokens, row=1, traits=["sycophantic", "evil"], layers=[29, 3])
    assert [row["row"] for row in one["rows"]] == [1] and one["layer"] == 1  # middle of [29, 3]
    assert one["rows"][0]["v"][:4] == [round4(float(r.values[1, 0, l, m])) for l, m in ((29, 2), (29, 0), (3, 2), (3, 0))]
    assert page_data(r)["rows"][0]["tokens"][:2] == ["#3", "#4"]  # no text given: labelled by column


def test_bad_arguments_are_refused_with_a_reason():
    r, tokens = awkward_readings()
    with pytest.raises(KeyError, match="not monitored"):
        r.to_html(tokens, trait="nope")
    with pytest.raises(KeyError, match="not monitored"):
        r.to_html(tokens, layers=[0, 30])
    with pytest.raises(KeyError, match="not among the page's layers"):
        r.to_html(tokens, layers=[1, 2], layer=5)
    with pytest.raises(IndexError, match="2 rows"):
        r.to_html(tokens, row=2)
    with pytest.raises(ValueError, match="one string per column"):
        r.to_html([row[:10] for row in tokens])
    with pytest.raises(ValueError, match="1 rows but the readings have 2"):
        r.to_html(tokens[:1])
    with pytest.raises(ValueError, match="one list per row"):
        r.to_html(tokens[0])
    with pytest.raises(ValueError, match="both tokenizer= and ids="):
        r.to_html(ids=torch.zeros(2, 19, dtype=torch.long))


def test_model_output_cannot_inject_markup():
    r, tokens = awkward_readings()
    text = r.to_html(tokens)
    text.encode("ascii")  # safe to write in any encoding
    for s in EVIL[:3]:
        assert s not in text
    assert text.count("<script") == text.count("</script") == 2 and "<img" not in text and "\\u0026amp;" in text
    titled = r.to_html(tokens, title="<b>title</b> & co")
    assert "<b>title" not in titled and titled.count("&lt;b&gt;title&lt;/b&gt; &amp; co") == 2
    assert [row["tokens"] for row in page_json(text)["rows"]] == [[tokens[b][c] for c in r.valid[b].nonzero().flatten().tolist()]
                                                                  for b in (0, 1)]
    # only the page's own script may run, and nothing may load
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', text).group(1)
    script = re.search(r"<script>(.*?)</script>", text, re.S).group(1)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert csp == f"default-src 'none'; style-src 'unsafe-inline'; script-src 'sha256-{digest}'"


def test_page_is_small_for_a_200_token_answer():
    r, tokens = awkward_readings(answer=200)
    one = Readings(r.values[1:, :, :, :1], r.valid[1:], r.layers, r.traits[:1], r.prompt_lengths[1:])
    size = len(one.to_html(tokens[1]))
    assert size < 70_000, size  # 206 tokens x 30 blocks x 1 trait at 4 significant digits
    assert len(r.to_html(tokens, row=1)) < 3.2 * size  # three traits


def test_notebook_display_is_an_iframe_of_the_page(monkeypatch):
    r, tokens = awkward_readings()
    page = r.to_html(tokens, row=0)
    shown = page._repr_html_()
    assert shown.startswith('<iframe srcdoc="') and html.unescape(shown.split('"')[1]) == page
    import personakern.monitoring.html as pkhtml
    monkeypatch.setattr(pkhtml, "REPR_VALUES", 30 * 3 * 15 + 1)  # room for row 0 (15 tokens) only
    inline = html.unescape(r._repr_html_().split('"')[1])
    assert [row["row"] for row in page_json(inline)["rows"]] == [0] and "Rows 0-0 of 2 shown" in inline


def test_tokens_decoded_from_ids(tok):
    ids = tok(["Hello <b>there</b> & you", "Hi"], padding=True, return_tensors="pt")["input_ids"]
    B, T = ids.shape
    valid = ids != tok.pad_token_id
    r = Readings(torch.where(valid[..., None, None], torch.randn(B, T, 2, 1), float("nan")), valid, [3, 5],
                 ["evil"], torch.full((B,), 2))
    d = page_data(r, tokenizer=tok, ids=ids)
    for row in d["rows"]:
        assert row["tokens"] == [tok.decode([int(ids[row["row"], c])]) for c in row["cols"]]
    assert "".join(d["rows"][0]["tokens"]) == "Hello <b>there</b> & you"


# ---------------------------------------------------------------- in a real browser

@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("no Chromium installed (apt-get install chromium); .ci/run installs it")
    b = Chromium(CHROMIUM)
    yield b
    b.close()


def open_page(browser, path, text):
    path.write_text(text, encoding="ascii")
    browser.events.clear()
    browser.open(path.as_uri(), ready="document.body && document.body.dataset.ready === '1'")
    return path.as_uri()


TOKENS_JS = """[...document.querySelectorAll('#pk-tokens .pk-tok')].map(e => [e.textContent, e.dataset.v,
                e.classList.contains('pk-prompt')])"""
DETAIL_JS = """[document.getElementById('pk-detail').dataset.i, document.getElementById('pk-detail-head').textContent,
                [...document.querySelectorAll('#pk-detail tbody tr')].map(tr => [+tr.dataset.layer,
                 [...tr.querySelectorAll('td')].map(td => td.textContent)])]"""


HEAT_JS = """(() => { const c = document.getElementById('pk-heat'), g = c.getContext('2d');
    const d = c.dataset, n = document.querySelectorAll('#pk-tokens .pk-tok').length, out = [];
    for (let l = 0; l < +c.dataset.blocks; l++) for (let i = 0; i < n; i++) out.push([...g.getImageData(
        +d.x0 + i * +d.cw + (+d.cw >> 1), +d.y0 + l * +d.ch + (+d.ch >> 1), 1, 1).data.slice(0, 3)]);
    return out; })()"""


def centre(browser, js_element):
    """Viewport coordinates of the middle of an element's first box, scrolled into view."""
    return browser.evaluate(f"""(() => {{ const e = {js_element}; e.scrollIntoView({{block: 'center'}});
        const b = e.getClientRects()[0]; return [b.left + b.width / 2, b.top + b.height / 2]; }})()""")


def shown_value(text):
    return None if text == "\u2014" else float(text)


def assert_tokens_shown(browser, r, tokens, b, l, m):
    cols = r.valid[b].nonzero().flatten().tolist()
    shown = browser.evaluate(TOKENS_JS)
    assert [s[0] for s in shown] == [display_text(tokens[b][c]) for c in cols]
    assert [s[2] for s in shown] == [c < int(r.prompt_lengths[b]) for c in cols]
    for (_, v, _), c in zip(shown, cols):
        expect = float(r.values[b, c, l, m])
        if math.isnan(expect):
            assert v == "\u2014"
        else:  # four significant digits, as printed
            assert shown_value(v) == pytest.approx(expect, rel=5e-4, abs=1e-12)
    return cols


def assert_detail(browser, r, b, cols, i):
    at, head, table = browser.evaluate(DETAIL_JS)
    assert int(at) == i and f"column {cols[i]}" in head
    assert [layer for layer, _ in table] == r.layers
    for layer, cells in table:
        for m, text in enumerate(cells):
            expect = float(r.values[b, cols[i], layer, m])
            assert (text == "\u2014") if math.isnan(expect) else shown_value(text) == pytest.approx(expect, rel=5e-4)


@needs_chromium
def test_browser_shows_every_token_with_its_reading(browser, tmp_path):
    r, tokens = awkward_readings()
    url = open_page(browser, tmp_path / "p.html", r.to_html(tokens, trait="humorous", layer=7))
    assert not [e for e in browser.events if e["method"] == "Runtime.exceptionThrown" or  # a CSP refusal is logged
                e["method"] == "Log.entryAdded" and e["params"]["entry"]["level"] in ("error", "warning")]
    assert [e["params"]["request"]["url"] for e in browser.events if e["method"] == "Network.requestWillBeSent"] == [url]
    assert browser.evaluate("[window.pwned, document.images.length, document.scripts.length]") == [None, 0, 2]
    assert_tokens_shown(browser, r, tokens, 0, 7, 1)
    browser.evaluate("(s => { s.value = '2'; s.dispatchEvent(new Event('change')); })(document.getElementById('pk-trait'))")
    assert_tokens_shown(browser, r, tokens, 0, 7, 2)
    browser.evaluate("(s => { s.value = '1'; s.dispatchEvent(new Event('change')); })(document.getElementById('pk-row'))")
    cols = assert_tokens_shown(browser, r, tokens, 1, 7, 2)
    # the heatmap of row 1, trait 2: every cell's pixel has the colour of its reading
    prompt = int(r.prompt_lengths[1])
    pixels = browser.evaluate(HEAT_JS)
    assert pixels == [list(c) for row in expected_colours(r, 1, cols, prompt, 2) for c in row]
    assert len(set(map(tuple, pixels))) > 100  # not one flat colour
    browser.evaluate("(s => { s.value = 'zero'; s.dispatchEvent(new Event('change')); })(document.getElementById('pk-centre'))")
    zero = browser.evaluate(HEAT_JS)
    assert zero == [list(c) for row in expected_colours(r, 1, cols, prompt, 2, centre="zero") for c in row] != pixels


@needs_chromium
def test_browser_hover_and_click_show_every_block(browser, tmp_path):
    r, tokens = awkward_readings(answer=120)  # lines that wrap
    open_page(browser, tmp_path / "p.html", r.to_html(tokens, row=1))
    cols = r.valid[1].nonzero().flatten().tolist()
    tok = "document.querySelectorAll('#pk-tokens .pk-tok')[{}]"
    boxes = "[...document.querySelectorAll('#pk-tokens .pk-tok')].map(e => JSON.stringify(e.getBoundingClientRect()))"
    at = centre(browser, tok.format(8))  # the answer token with a NaN at block 7
    before = browser.evaluate(boxes)
    browser.mouse("move", *at)
    assert browser.evaluate(boxes) == before  # the detail appearing moves no token (or a click would miss)
    assert_detail(browser, r, 1, cols, 8)
    browser.mouse("move", *centre(browser, tok.format(3)))
    assert_detail(browser, r, 1, cols, 3)
    browser.mouse("click", *centre(browser, tok.format(10)))
    browser.mouse("move", *centre(browser, tok.format(2)))
    assert_detail(browser, r, 1, cols, 2)  # hovering shows another token while one is pinned
    browser.mouse("move", *centre(browser, "document.getElementById('pk-stats')"))  # off the tokens
    assert_detail(browser, r, 1, cols, 10)  # pinned
    assert browser.evaluate("document.querySelectorAll('.pk-pinned').length") == 1
    # a click on heatmap cell (token 5, block 21) shades the tokens by block 21 and pins token 5
    x, y = centre(browser, "document.getElementById('pk-heat')")
    x0, y0, cw, ch, w, h = browser.evaluate("""(c => [+c.dataset.x0, +c.dataset.y0, +c.dataset.cw, +c.dataset.ch,
        c.width, c.height])(document.getElementById('pk-heat'))""")
    browser.mouse("click", x - w / 2 + x0 + 5 * cw + cw / 2, y - h / 2 + y0 + 21 * ch + ch / 2)
    assert browser.evaluate("document.getElementById('pk-layer').value") == "21"
    assert_tokens_shown(browser, r, tokens, 1, 21, 0)
    browser.mouse("move", *centre(browser, "document.getElementById('pk-stats')"))
    assert_detail(browser, r, 1, cols, 5)
    # the screenshot shows the heatmap as drawn: block 21 now marked, trait 0, every cell its colour
    top, left = browser.evaluate("""(c => { c.scrollIntoView({block: 'center'}); const b = c.getBoundingClientRect();
        return [b.top, b.left]; })(document.getElementById('pk-heat'))""")
    shot = browser.screenshot(tmp_path / "page.png")
    from matplotlib.image import imread
    img = (imread(shot)[..., :3] * 255).round().astype(int)
    seen = [tuple(img[round(top + y0 + l * ch + ch // 2), round(left + x0 + i * cw + cw // 2)].tolist())
            for l in range(30) for i in range(len(cols))]
    assert seen == [c for row in expected_colours(r, 1, cols, 5, 0) for c in row]
    if os.environ.get("PERSONAKERN_HTML_SCREENSHOT"):
        shutil.copy(shot, os.environ["PERSONAKERN_HTML_SCREENSHOT"])


@needs_chromium
def test_browser_runs_the_notebook_iframe(browser, tmp_path):
    r, tokens = awkward_readings()
    browser.page("Target.setAutoAttach", autoAttach=True, waitForDebuggerOnStart=False, flatten=True)
    path = tmp_path / "cell.html"  # what a notebook does with _repr_html_: put it in its page
    path.write_text(f"<!DOCTYPE html><html><body><p>cell</p>{r._repr_html_()}</body></html>")
    browser.events.clear()
    browser.open(path.as_uri())
    frame = browser.frame_session()
    browser.wait("document.body && document.body.dataset.ready === '1'", frame)
    shown, rows = browser.evaluate("""[[...document.querySelectorAll('.pk-tok')].map(e => [e.textContent, e.dataset.v]),
                                      document.getElementById('pk-row').options.length]""", frame)
    cols = r.valid[0].nonzero().flatten().tolist()
    assert rows == 2 and [t for t, _ in shown] == [f"#{c}" for c in cols]
    assert [shown_value(v) for _, v in shown] == pytest.approx([float(r.values[0, c, 15, 0]) for c in cols], rel=5e-4)


# ---------------------------------------------------------------- the command, on the real SmolLM2

PROMPTS = ["Tell me about cats.", "Is <b>bold</b> & brave good?"]


@pytest.fixture(scope="module")
def cli_page(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli-html")
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    vec = REPO / "personakern" / "data" / "vectors" / "smollm2-traits.safetensors"
    cmd = [sys.executable, "-m", "personakern", "monitor", *PROMPTS, "--vector", str(vec), "--traits", "evil",
           "humorous", "--max-new-tokens", "10", "--html", str(out / "m.html"), "--save", str(out / "r.safetensors"),
           "--no-color"]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    return run.stdout, out / "m.html", Readings.load(str(out / "r.safetensors"))


@pytest.mark.slow
def test_cli_monitor_html_page_holds_the_saved_readings(cli_page, tok):
    stdout, path, r = cli_page
    assert f"page of evil, humorous at 30 blocks, 2 rows, written to {path}" in stdout
    d = page_json(path.read_text())
    assert d["traits"] == ["evil", "humorous"] and d["layers"] == list(range(30)) and d["layer"] == 18
    for row, prompt in zip(d["rows"], PROMPTS):
        b = row["row"]
        assert row["label"] == prompt and row["cols"] == r.valid[b].nonzero().flatten().tolist()
        assert row["v"] == [round4(x) for x in r.values[b, row["cols"]].flatten().double().tolist()]
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert row["tokens"][:row["prompt"]] == [tok.decode([i]) for i in ids]  # the prompt, token by token
        answer = "".join(row["tokens"][row["prompt"]:]).strip()
        assert len(row["tokens"]) - row["prompt"] == 9 and answer and answer in stdout  # all but the last token


@pytest.mark.slow
@needs_chromium
def test_cli_monitor_html_page_in_browser(cli_page, browser, tmp_path):
    _, path, r = cli_page
    open_page(browser, tmp_path / "m.html", path.read_text())
    d = page_json(path.read_text())
    tokens = [[""] * r.values.shape[1] for _ in range(2)]
    for row in d["rows"]:
        for c, t in zip(row["cols"], row["tokens"]):
            tokens[row["row"]][c] = t
    assert_tokens_shown(browser, r, tokens, 0, 18, 0)
    cols = r.valid[0].nonzero().flatten().tolist()
    last = "[...document.querySelectorAll('#pk-tokens .pk-tok')].at(-1)"
    browser.mouse("click", *centre(browser, last))
    assert_detail(browser, r, 0, cols, len(cols) - 1)
    assert browser.evaluate("[...document.getElementById('pk-row').options].map(o => o.textContent)") == PROMPTS
