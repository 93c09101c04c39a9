"""Bad input gets a clear error and leaves the model as it was."""
from __future__ import annotations

import pytest
import torch
import transformers

import personakern
from personakern import PersonaVector, VectorFileError
from conftest import padded_batch, tiny_model


@pytest.fixture
def setup():
    model = tiny_model("llama")
    batch = padded_batch()
    with torch.no_grad():
        ref = model(**batch).logits
    handle = personakern.patch(model)
    good = torch.randn(3, 40)
    handle.steer(good, 0.0, layers=1)  # active but zero: must stay exactly the reference

    def unchanged():
        with torch.no_grad():
            return (model(**batch).logits - ref).abs().max().item() <= 1e-5

    yield model, handle, unchanged
    handle.unpatch()


@pytest.mark.parametrize("bad, message", [
    (torch.randn(3, 41), r"expected \[3, 40\], got \[3, 41\]"),
    (torch.randn(4, 40), r"expected \[3, 40\], got \[4, 40\]"),
    (torch.randn(40), r"expected \[3, 40\]"),
    (torch.ones(3, 40, dtype=torch.long), "float"),
])
def test_wrong_vector_shape_or_dtype(setup, bad, message):
    model, handle, unchanged = setup
    with pytest.raises(VectorFileError, match=message):
        handle.steer(bad, 4.0, layers=1, name="bad")
    with pytest.raises(VectorFileError, match=message):
        handle.monitor({"bad": bad})
    assert "bad" not in handle.steering and unchanged()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_vector(setup, value):
    model, handle, unchanged = setup
    bad = torch.randn(3, 40)
    bad[2, 5] = value
    with pytest.raises(VectorFileError, match="non-finite.*2"):
        handle.steer(bad, 1.0, layers=2)
    assert unchanged()


def test_vector_made_for_another_model(setup, tmp_path):
    model, handle, unchanged = setup
    other = tiny_model("qwen2")
    pv = PersonaVector("evil", torch.randn(3, 40),
                       {"model": personakern.vectors.model_fingerprint(other)})
    with pytest.raises(VectorFileError, match="model_type"):
        handle.steer(pv, 2.0, layers=1)
    path = tmp_path / "evil.safetensors"
    pv.save(path)
    with pytest.raises(VectorFileError, match="model_type"):
        PersonaVector.load(path, model=model)
    wide = PersonaVector("evil", torch.randn(3, 64), {})
    wide.save(path)
    with pytest.raises(VectorFileError, match="hidden"):
        PersonaVector.load(path, model=model)
    assert unchanged()


def test_truncated_and_foreign_files(setup, tmp_path):
    model, handle, unchanged = setup
    path = tmp_path / "v.safetensors"
    PersonaVector("evil", torch.randn(3, 40), {}).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(VectorFileError, match="not a valid safetensors file"):
        PersonaVector.load(path, model=model)
    with pytest.raises(VectorFileError, match="missing.safetensors: file not found"):
        PersonaVector.load(tmp_path / "missing.safetensors")
    assert unchanged()


@pytest.mark.parametrize("kwargs, message", [
    ({"layers": 3}, "out of range"),
    ({"layers": [-4]}, "out of range"),
    ({"layers": []}, "empty"),
    ({"layers": "most"}, "'all'"),
    ({"layers": None}, "say which layers"),
    ({"layers": 1, "positions": "answer"}, "positions must be one of"),
    ({"layers": 1, "alpha": float("nan")}, "not finite"),
    ({"layers": 1, "alpha": torch.ones(2, 2)}, "one value per batch row"),
])
def test_bad_steering_arguments(setup, kwargs, message):
    model, handle, unchanged = setup
    kwargs.setdefault("alpha", 1.0)
    with pytest.raises(ValueError, match=message):
        handle.steer(torch.randn(3, 40), **kwargs)
    assert unchanged()


def test_alpha_rows_must_match_batch(setup):
    model, handle, unchanged = setup
    handle.steer(torch.randn(3, 40), [1.0, 2.0], layers=1, name="rows")
    with pytest.raises(ValueError, match="alpha has 2 rows but the batch has 3"):
        with torch.no_grad():
            model(**padded_batch())
    handle.clear("rows")
    assert unchanged()


def test_zero_vector_cannot_be_monitored(setup):
    model, handle, unchanged = setup
    v = torch.randn(3, 40)
    v[1] = 0
    with pytest.raises(ValueError, match="zero vector at layers \\[1\\]"):
        handle.monitor({"z": v})
    handle.monitor({"z": v}, layers=[0, 2])  # fine where it is non-zero
    assert unchanged()


def test_unsupported_model_is_refused_untouched():
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64)
    model = transformers.GPT2LMHeadModel(config).eval()
    with pytest.raises(personakern.UnsupportedModelError, match="supported model types: gemma2.*llama"):
        personakern.patch(model)
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_using_an_unpatched_handle(setup):
    model, handle, unchanged = setup
    handle.unpatch()
    with pytest.raises(RuntimeError, match="unpatched"):
        handle.steer(torch.randn(3, 40), 1.0, layers=1)
    assert unchanged()
