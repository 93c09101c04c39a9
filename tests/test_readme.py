"""The front page and docs/ say what runs: links resolve, every command shown parses, the cheap
ones run, and the Python API tour runs as printed (with fewer tokens)."""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from personakern.cli.main import build_parser, main

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README] + sorted((ROOT / "docs").glob("*.md"))
SETUP = "./install.sh && .venv/bin/personakern demo"
TESTS = "./install.sh && .venv/bin/python -m pytest -q"
CHEAP = {"info", "traits", "report", "vectors"}  # commands that load at most the model: run them


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def _anchors(page: Path) -> set:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # '# comments' in code are not headings
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, flags=re.M)}


def _code_blocks(page: Path):
    """``(language, body)`` of every fenced block."""
    return re.findall(r"^```(\w*)\n(.*?)^```", page.read_text(), flags=re.S | re.M)


def _commands_in(body: str) -> list:
    """The ``personakern ...`` command lines of a code block as argv lists: continuation lines
    joined, comments and ``[optional]`` groups removed; ``python -m personakern`` and ``torchrun
    ... -m personakern`` count too."""
    out = []
    for line in body.replace("\\\n", " ").splitlines():
        line = line.split(" #", 1)[0].strip()
        if "-m personakern " in line:
            line = "personakern " + line.split("-m personakern ", 1)[1]
        if not line.startswith("personakern ") or "..." in line:
            continue  # printed output ('$ personakern ...' transcripts) and elided examples
        out.append(shlex.split(re.sub(r"\[[^\]]*\]", "", line))[1:])
    return out


def _commands(page: Path) -> list:
    return [argv for lang, body in _code_blocks(page) if lang in ("", "bash") for argv in _commands_in(body)]


def test_setup_commands_are_verbatim_and_ci_runs_the_second():
    text = README.read_text()
    assert f"```bash\n{SETUP}\n```" in text and f"```bash\n{TESTS}\n```" in text
    assert TESTS in (ROOT / ".ci" / "run").read_text()


def test_front_page_stays_a_front_page():
    assert len(README.read_text().splitlines()) <= 250


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.name}: link to missing {target}"
        if anchor and dest.suffix == ".md":
            assert anchor in _anchors(dest), f"{page.name}: no heading #{anchor} in {dest.name}"


def test_design_references_resolve_in_the_repo():
    """Code comments cite docs/design.md by section; the old out-of-tree DESIGN.md is gone."""
    old = re.compile(r"DESIGN(\.md| §)")
    anchors = _anchors(ROOT / "docs" / "design.md")
    cited = 0
    for folder in ("personakern", "tests", "benchmarks"):
        for f in (ROOT / folder).rglob("*.py"):
            if f.name == Path(__file__).name:
                continue
            text = f.read_text()
            assert not old.search(text), f"{f}: cites DESIGN outside docs/design.md"
            for anchor in re.findall(r"docs/design\.md#([\w-]+)", text):
                assert anchor in anchors, f"{f}: docs/design.md has no #{anchor}"
                cited += 1
    assert cited >= 5


def test_every_command_shown_parses():
    parser = build_parser()
    seen = set()
    for page in PAGES:
        for argv in _commands(page):
            try:
                parser.parse_args(argv)
            except SystemExit:
                pytest.fail(f"{page.name}: personakern {' '.join(argv)} does not parse")
            seen.add(argv[0])
    assert {"demo", "steer", "monitor", "info", "traits", "extract", "report", "vectors", "screen",
            "shift", "bench"} <= seen


def test_help_runs_as_a_module():
    out = subprocess.run([sys.executable, "-m", "personakern", "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    for command in ("demo", "steer", "monitor", "extract", "screen", "shift"):
        assert command in out.stdout


def _front_page_cheap_commands():
    block = next(body for lang, body in _code_blocks(README) if lang == "" and "personakern demo" in body)
    return [argv for argv in _commands_in(block) if argv[0] in CHEAP]


@pytest.mark.slow
def test_front_page_cheap_commands_run(capsys, monkeypatch, tmp_path, smollm2):
    """info, traits list, report and vectors export, as printed (outputs land in a temp folder)."""
    runs = _front_page_cheap_commands()
    assert {argv[0] for argv in runs} == CHEAP
    monkeypatch.chdir(tmp_path)
    for argv in runs:
        argv = [str(ROOT / a) if (ROOT / a).is_file() else a for a in argv]
        assert main(argv) == 0, argv
        out = capsys.readouterr().out
        if argv[0] == "info":
            assert "llama" in json.loads(out)["supported_model_types"]
        if argv[0] == "traits":
            assert all(t in out for t in ("evil", "sycophantic", "humorous"))
    # blocks 1-29 in float32 (block 0 is left out: llama.cpp never applies it)
    assert (tmp_path / "evil.gguf").stat().st_size > 29 * 576 * 4


@pytest.mark.slow
def test_python_api_tour_runs(smollm2):
    code = next(body for lang, body in _code_blocks(README) if lang == "python" and "personakern.patch" in body)
    assert "max_new_tokens=40" in code
    ns: dict = {}
    exec(compile(code.replace("max_new_tokens=40", "max_new_tokens=5"), "README.md", "exec"), ns)
    r, out = ns["r"], ns["out"]
    assert ns["evil"].meta["layer"] == 18 and ns["evil"].meta["judge"].startswith("likelihood")
    assert r.traits == ["evil"] and r.layers == list(range(30)) and out.shape[0] == 3
    mean24 = r.response_mean()[:, 24, 0].tolist()
    assert mean24[0] < mean24[1] < mean24[2]  # alpha -3, 0, +3 at block 18 move block 24's reading
    assert str(ns["page"]).lstrip().lower().startswith("<!doctype html")


@pytest.mark.slow
def test_readme_shows_what_the_demo_prints(capsys, smollm2):
    """The front page's demo transcript is the current demo's (greedy: the answers' first words
    do not depend on how many tokens are generated)."""
    text = README.read_text()
    transcript = text[text.index("What `personakern demo` prints"):text.index("## Python API")]
    assert main(["demo", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("persona vector"))
    assert header in transcript
    flat = " ".join(transcript.split())
    answers = [line for line in out.splitlines() if line.startswith("[alpha ")]
    assert len(answers) == 3
    for line in answers:
        head, answer = line.split("] ", 1)
        assert head.rsplit(": ", 1)[0] in flat  # alpha and block; the mean depends on the length
        assert " ".join(answer.split()[:4]) in flat, answer


@pytest.mark.slow
def test_best_vector_prefers_the_judged_file_and_falls_back(monkeypatch, smollm2):
    """The tour's and the demo's vector: the judged pipeline's for SmolLM2, else default_vector."""
    import torch
    from personakern import VectorSet
    from personakern.extraction import quick
    from conftest import tiny_model
    model, tok = smollm2
    judged = VectorSet.load(ROOT / "personakern/data/vectors/smollm2-traits.safetensors")
    for trait in ("evil", "humorous"):
        pv = quick.best_vector(model, tok, trait)
        assert torch.equal(pv.vectors, judged[trait].vectors) and pv.meta["layer"] == judged[trait].meta["layer"]
    calls = []
    monkeypatch.setattr(quick, "default_vector", lambda m, t, trait, **kw: calls.append((m, trait)) or "quick")
    assert quick.best_vector(model, tok, "grumpy") == "quick"        # not a trait of the file
    other = tiny_model("llama")
    assert quick.best_vector(other, tok, "evil") == "quick"          # not the file's model
    assert calls == [(model, "grumpy"), (other, "evil")]
