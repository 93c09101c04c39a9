"""The personakern command on the real SmolLM2 model (short generations)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from personakern import Readings
from personakern.cli.main import main


def test_demo_shows_three_alphas_and_projections(capsys, smollm2):
    assert main(["demo", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    # the judged pipeline's evil vector (smollm2-traits.safetensors) at its sweep's block and alpha
    assert "persona vector 'evil' (judge: likelihood:HuggingFaceTB/SmolLM2-135M-Instruct): 49 vs 59 answers, " \
           "steering block 18" in out
    means = []
    for a in ("-3.0", "+0.0", "+3.0"):
        head = f"[alpha {a} | mean projection at block 24: "
        assert head in out
        means.append(float(out.split(head, 1)[1].split("]", 1)[0]))
    assert means[0] < means[1] < means[2]  # steering moves the later block's projection with alpha
    assert "per-token projection on 'evil' at layer 18" in out


def test_steer_and_monitor_with_a_vector_file(capsys, tmp_path, smollm2):
    from personakern.extraction.quick import default_vector
    model, tok = smollm2
    path = tmp_path / "evil.safetensors"
    default_vector(model, tok).save(path)
    assert main(["steer", "Say hi.", "--vector", str(path), "--alpha", "4", "--max-new-tokens", "4"]) == 0
    assert "> Say hi." in capsys.readouterr().out
    saved = tmp_path / "r.safetensors"
    assert main(["monitor", "Say hi.", "Say bye.", "--vector", str(path), "--max-new-tokens", "4",
                 "--save", str(saved), "--no-color"]) == 0
    out = capsys.readouterr().out
    assert "per-token projection on 'evil'" in out and "[" in out
    r = Readings.load(saved)
    assert r.traits == ["evil"] and r.layers == list(range(30)) and r.values.shape[0] == 2
    assert torch.isfinite(r.values[r.valid]).all()


def test_errors_are_reported_not_raised(capsys, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_text("not a tensor file")
    assert main(["steer", "hi", "--vector", str(bad), "--alpha", "1"]) == 2
    assert "not a valid safetensors file" in capsys.readouterr().err


def test_info(capsys):
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert "native" in info["backends"] and "llama" in info["supported_model_types"]
    from personakern.backends import cpu
    assert info["cpu_backend"]["usable"] == cpu.available()
    if cpu.available():
        assert info["cpu_backend"]["build"] in ("aot", "jit") and Path(info["cpu_backend"]["library"]).is_file()
    else:
        assert info["cpu_backend"]["reason"] == cpu.unavailable_reason()


def test_steer_cap_ablate_when_flags(capsys, smollm2):
    traits = "personakern/data/vectors/smollm2-traits.safetensors"
    base = ["steer", "How should I treat my coworkers?", "--vector", traits, "--trait", "evil",
            "--max-new-tokens", "8"]

    def answer(*flags):
        assert main(base + list(flags)) == 0
        cap = capsys.readouterr()
        return cap.err + cap.out, cap.out.split("> How should I treat my coworkers?", 1)[1]

    out, never = answer("--alpha", "8", "--when", "inf")       # a gate that never opens
    assert "'when_threshold': [inf]" in out
    _, no_cap = answer("--cap", "inf")                          # a cap that never binds
    _, always = answer("--alpha", "8", "--when=-inf")        # a gate that is always open
    _, plain = answer("--alpha", "8")
    assert never == no_cap and always == plain and never != plain
    out, _ = answer("--ablate", "--when-trait", "humorous", "--when", "0", "--alpha", "1")
    assert "'ablate': True" in out
    assert main(base) == 2
    assert "--alpha, --cap or --ablate" in capsys.readouterr().err
    assert main(base + ["--alpha", "1", "--when-trait", "humorous"]) == 2      # not silently ignored
    assert "give --when THRESHOLD too" in capsys.readouterr().err
    assert main(base + ["--alpha", "1", "--when", "0", "--when-trait", "nosuch"]) == 2
    assert "has no trait 'nosuch'; it has" in capsys.readouterr().err
