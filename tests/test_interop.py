"""Interop with other vector formats: llama.cpp / repeng GGUF control vectors, the reference
implementation's ``.pt`` layout and live repeng ControlVector objects.

Layer convention under test: personakern row l = output of decoder block l (0-based);
GGUF ``direction.{l}`` = block l (no shift); reference ``.pt`` row l+1 = block l (shift by one).
Files are checked with independent readers (``gguf.GGUFReader``, ``torch.load``) and written
independently (``gguf.GGUFWriter`` the way repeng does) so the conventions are pinned from outside.
"""
from __future__ import annotations

import os
import types

import gguf
import numpy as np
import pytest
import torch
import transformers

from personakern.interop import (export_gguf, export_reference_pt, from_repeng, import_gguf,
                                 import_reference_pt, import_repeng, import_vector, to_repeng_directions)
from personakern.vectors import PersonaVector, VectorFileError, VectorSet, model_fingerprint

L, D = 4, 40


@pytest.fixture(scope="module")
def model():
    cfg = transformers.LlamaConfig(hidden_size=D, num_hidden_layers=L, intermediate_size=64,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


@pytest.fixture
def pv(model):
    g = torch.Generator().manual_seed(3)
    return PersonaVector("evil", torch.randn(L, D, generator=g), {"model": model_fingerprint(model)})


def _field(reader, key):
    f = reader.get_field(key)
    assert f is not None, key
    return f.contents()


def write_repeng_style(path, directions, model_hint="llama", arch="controlvector"):
    """What repeng 0.4 ``ControlVector.export_gguf`` does, written out independently."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_string(f"{arch}.model_hint", model_hint)
    writer.add_uint32(f"{arch}.layer_count", len(directions))
    for layer, vec in directions.items():
        writer.add_tensor(f"direction.{layer}", vec)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _vec(seed, d=D):
    return np.random.default_rng(seed).standard_normal(d).astype(np.float32)


# ---------------------------------------------------------------- GGUF

def test_gguf_export_read_independently(pv, tmp_path):
    path = tmp_path / "evil.gguf"
    written = export_gguf(pv, path)
    assert written == [1, 2, 3]
    r = gguf.GGUFReader(str(path))
    assert _field(r, "general.architecture") == "controlvector"
    assert _field(r, "controlvector.model_hint") == "llama"
    assert _field(r, "controlvector.layer_count") == L - 1
    assert r.get_field("controlvector.layer_count").types == [gguf.GGUFValueType.UINT32]
    names = {t.name: t for t in r.tensors}
    assert set(names) == {f"direction.{l}" for l in range(1, L)}  # never direction.0
    for l in range(1, L):
        t = names[f"direction.{l}"]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        assert t.data.shape == (D,)
        np.testing.assert_array_equal(np.asarray(t.data), pv.vectors[l].numpy())


def test_gguf_round_trip(pv, model, tmp_path):
    path = tmp_path / "evil.gguf"
    export_gguf(pv, path)
    back = import_gguf(path, model=model)
    assert back.trait == "evil"
    assert back.vectors.shape == (L, D)
    assert torch.equal(back.vectors[0], torch.zeros(D))
    assert torch.equal(back.vectors[1:], pv.vectors[1:])
    src = back.meta["source"]
    assert src["format"] == "gguf-controlvector" and src["layers"] == [1, 2, 3]
    assert src["model_hint"] == "llama" and src["path"] == os.path.abspath(path)
    assert "block l" in src["layer_convention"]
    assert back.meta["model"] == model_fingerprint(model)
    # and it is a valid personakern vector file after import
    back.save(tmp_path / "evil.safetensors")
    assert torch.equal(PersonaVector.load(tmp_path / "evil.safetensors", model=model).vectors, back.vectors)


def test_gguf_repeng_style_file_pins_index(model, tmp_path):
    a, b = _vec(1), _vec(2)
    path = tmp_path / "cv.gguf"
    write_repeng_style(path, {2: a, 3: b})
    pv = import_gguf(path, model=model, trait="calm")
    assert pv.trait == "calm" and pv.vectors.shape == (L, D)
    assert torch.equal(pv.vectors[0], torch.zeros(D)) and torch.equal(pv.vectors[1], torch.zeros(D))
    assert torch.equal(pv.vectors[2], torch.from_numpy(a))
    assert torch.equal(pv.vectors[3], torch.from_numpy(b))
    # without a model: max layer + 1 rows; trait = file stem
    write_repeng_style(tmp_path / "two.gguf", {1: a})
    pv2 = import_gguf(tmp_path / "two.gguf")
    assert pv2.trait == "two" and pv2.vectors.shape == (2, D)
    assert torch.equal(pv2.vectors[1], torch.from_numpy(a)) and not pv2.vectors[0].any()
    assert pv2.meta["model"]["model_type"] == "llama"
    pv3 = import_gguf(tmp_path / "two.gguf", num_layers=L)  # the file cannot say how many layers
    assert pv3.vectors.shape == (L, D) and torch.equal(pv3.vectors[:2], pv2.vectors)
    with pytest.raises(VectorFileError, match="num_layers=1"):
        import_gguf(tmp_path / "two.gguf", num_layers=1)
    with pytest.raises(VectorFileError, match=f"num_layers=3 but the model has {L}"):
        import_gguf(path, model=model, num_layers=3)
    # import_repeng is the same reader
    assert torch.equal(import_repeng(path, model=model).vectors, pv.vectors)


def test_gguf_export_layers_scale_and_layer0_warning(pv, tmp_path):
    path = tmp_path / "sub.gguf"
    assert export_gguf(pv, path, layers=[3, 1], scale=-2.0) == [1, 3]
    r = gguf.GGUFReader(str(path))
    names = {t.name: np.asarray(t.data) for t in r.tensors}
    assert set(names) == {"direction.1", "direction.3"}
    np.testing.assert_allclose(names["direction.3"], -2.0 * pv.vectors[3].numpy(), rtol=0, atol=0)
    assert _field(r, "controlvector.layer_count") == 2
    with pytest.warns(UserWarning, match="llama.cpp"):
        export_gguf(pv, tmp_path / "zero.gguf", layers=[0, 2])
    assert {t.name for t in gguf.GGUFReader(str(tmp_path / "zero.gguf")).tensors} == {"direction.0", "direction.2"}
    with pytest.raises(VectorFileError, match="out of range"):
        export_gguf(pv, tmp_path / "bad.gguf", layers=[L])


def test_gguf_default_skips_zero_rows(pv, tmp_path):
    v = pv.vectors.clone()
    v[2] = 0
    p = PersonaVector("x", v, pv.meta)
    assert export_gguf(p, tmp_path / "x.gguf") == [1, 3]
    only0 = torch.zeros(L, D)
    only0[0] = 1
    with pytest.raises(VectorFileError, match="nothing to export"):
        export_gguf(PersonaVector("y", only0, pv.meta), tmp_path / "y.gguf")


def test_gguf_model_hint_required(tmp_path):
    pv = PersonaVector("t", torch.ones(3, 8))
    with pytest.raises(VectorFileError, match="model_hint"):
        export_gguf(pv, tmp_path / "t.gguf")
    assert not (tmp_path / "t.gguf").exists()
    export_gguf(pv, tmp_path / "t.gguf", model_hint="qwen2")
    assert _field(gguf.GGUFReader(str(tmp_path / "t.gguf")), "controlvector.model_hint") == "qwen2"


def test_gguf_layer_beyond_model(model, tmp_path):
    path = tmp_path / "big.gguf"
    write_repeng_style(path, {1: _vec(1), L: _vec(2)})
    with pytest.raises(VectorFileError, match=rf"big.gguf.*blocks \[{L}\].*{L} layers"):
        import_gguf(path, model=model)


def test_gguf_wrong_hidden_size(model, tmp_path):
    path = tmp_path / "h.gguf"
    write_repeng_style(path, {1: _vec(1, d=D + 1)})
    with pytest.raises(VectorFileError, match=rf"h.gguf.*size {D + 1}.*hidden_size is {D}"):
        import_gguf(path, model=model)


def test_gguf_mixed_sizes(tmp_path):
    path = tmp_path / "m.gguf"
    write_repeng_style(path, {1: _vec(1), 2: _vec(2, d=D - 1)})
    with pytest.raises(VectorFileError, match="different sizes"):
        import_gguf(path)


def test_gguf_wrong_hint(model, tmp_path):
    path = tmp_path / "hint.gguf"
    write_repeng_style(path, {1: _vec(1)}, model_hint="mistral")
    with pytest.raises(VectorFileError, match=r"hint.gguf.*'mistral'.*llama"):
        import_gguf(path, model=model)


def test_gguf_nan(tmp_path):
    a = _vec(1)
    a[5] = np.nan
    path = tmp_path / "nan.gguf"
    write_repeng_style(path, {1: _vec(0), 2: a})
    with pytest.raises(VectorFileError, match=r"nan.gguf.*direction\.2.*non-finite"):
        import_gguf(path)


def test_gguf_not_gguf_and_missing(tmp_path):
    p = tmp_path / "junk.gguf"
    p.write_bytes(b"this is not a gguf file at all" * 4)
    with pytest.raises(VectorFileError, match="junk.gguf.*not a valid GGUF"):
        import_gguf(p)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(VectorFileError, match="empty.gguf.*not a valid GGUF"):
        import_gguf(empty)
    with pytest.raises(VectorFileError, match="nope.gguf.*not found"):
        import_gguf(tmp_path / "nope.gguf")


def test_gguf_wrong_architecture(tmp_path):
    path = tmp_path / "model.gguf"
    write_repeng_style(path, {1: _vec(1)}, arch="llama")
    with pytest.raises(VectorFileError, match=r"model.gguf.*architecture is 'llama'"):
        import_gguf(path)


def test_gguf_bad_names_and_shapes(tmp_path):
    def write(name, tensors, hint=True):
        path = tmp_path / name
        w = gguf.GGUFWriter(str(path), "controlvector")
        if hint:
            w.add_string("controlvector.model_hint", "llama")
        for n, t in tensors.items():
            w.add_tensor(n, t)
        w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
        return path

    with pytest.raises(VectorFileError, match=r"bad tensor name 'direction\.x'"):
        import_gguf(write("n1.gguf", {"direction.x": _vec(1)}))
    with pytest.raises(VectorFileError, match=r"bad tensor name 'direction\.1\.2'"):
        import_gguf(write("n2.gguf", {"direction.1.2": _vec(1)}))
    with pytest.raises(VectorFileError, match=r"direction\.1.*shape \[2, 40\].*1-D"):
        import_gguf(write("s.gguf", {"direction.1": np.ones((2, D), np.float32)}))
    with pytest.raises(VectorFileError, match="no 'direction.<l>' tensors"), \
            pytest.warns(UserWarning, match=r"ignoring non-direction tensors \['other'\]"):
        import_gguf(write("none.gguf", {"other": _vec(1)}))
    with pytest.raises(VectorFileError, match="model_hint"):
        import_gguf(write("nohint.gguf", {"direction.1": _vec(1)}, hint=False))


def test_gguf_atomic_on_writer_failure(pv, tmp_path, monkeypatch):
    path = tmp_path / "keep.gguf"
    export_gguf(pv, path, layers=[1])
    before = path.read_bytes()

    def boom(self, *a, **k):
        raise RuntimeError("disk on fire")
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        export_gguf(pv, path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["keep.gguf"]  # no temp file left behind


def test_gguf_atomic_on_nan_vector(pv, tmp_path):
    path = tmp_path / "keep.gguf"
    export_gguf(pv, path)
    before = path.read_bytes()
    pv.vectors[2, 7] = float("nan")  # mutated after construction: caught on export
    with pytest.raises(VectorFileError, match="non-finite"):
        export_gguf(pv, path)
    pv.vectors[2, 7] = 0.0
    with pytest.raises(VectorFileError, match="non-finite"):
        export_gguf(pv, path, scale=1e39)  # overflows float32
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["keep.gguf"]


# ---------------------------------------------------------------- reference .pt

def _ramp(rows, d=D):
    return torch.arange(rows, dtype=torch.float32)[:, None].expand(rows, d).contiguous()


def test_reference_import_shifts_rows(model, tmp_path):
    path = tmp_path / "evil_response_avg_diff.pt"
    torch.save(_ramp(L + 1), path)  # row r filled with value r; row 0 = embedding output
    pv = import_reference_pt(path, model=model)
    assert pv.trait == "evil_response_avg_diff" and pv.vectors.shape == (L, D)
    for l in range(L):
        assert torch.all(pv.vectors[l] == l + 1), l
    assert pv.meta["source"]["format"] == "reference-pt"
    assert pv.meta["source"]["file_shape"] == [L + 1, D]
    assert pv.meta["model"] == model_fingerprint(model)
    # no model: same shift
    assert torch.equal(import_reference_pt(path).vectors, pv.vectors)


def test_reference_convention_matches_hidden_states(model, tmp_path):
    """A reference-layout tensor built from output_hidden_states imports to rows equal to the
    outputs of model.model.layers[l], captured with hooks (independent of our index arithmetic)."""
    ids = torch.randint(3, 100, (1, 6), generator=torch.Generator().manual_seed(0))
    outs = {}
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o[0] if isinstance(o, tuple) else o))
             for i, layer in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            hs = model(ids, output_hidden_states=True).hidden_states
    finally:
        for h in hooks:
            h.remove()
    ref = torch.stack([h[0, -1] for h in hs])  # [L+1, D], the reference layout
    path = tmp_path / "hs.pt"
    torch.save(ref, path)
    pv = import_reference_pt(path, model=model)
    # HF applies the final norm to the last hidden state, so compare blocks 0..L-2.
    for l in range(L - 1):
        torch.testing.assert_close(pv.vectors[l], outs[l].reshape(-1, D)[-1])


def test_reference_export(pv, tmp_path):
    path = tmp_path / "out.pt"
    export_reference_pt(pv, path)
    t = torch.load(path, map_location="cpu", weights_only=True)
    assert isinstance(t, torch.Tensor) and t.shape == (L + 1, D) and t.dtype == torch.float32
    assert torch.equal(t, torch.cat([torch.zeros(1, D), pv.vectors]))
    assert torch.equal(import_reference_pt(path).vectors, pv.vectors)


def test_reference_export_atomic(pv, tmp_path):
    path = tmp_path / "out.pt"
    path.write_bytes(b"old contents")
    pv.vectors[0, 0] = float("inf")
    with pytest.raises(VectorFileError, match="non-finite"):
        export_reference_pt(pv, path)
    assert path.read_bytes() == b"old contents"
    assert sorted(os.listdir(tmp_path)) == ["out.pt"]


def test_reference_block_indexed_file_is_ambiguous(model, tmp_path):
    path = tmp_path / "blocks.pt"
    torch.save(_ramp(L), path)
    with pytest.raises(VectorFileError, match=r"blocks.pt.*layer_offset=0"):
        import_reference_pt(path, model=model)
    pv = import_reference_pt(path, model=model, layer_offset=0)
    assert torch.equal(pv.vectors, _ramp(L))
    torch.save(_ramp(L + 4), path)
    with pytest.raises(VectorFileError, match=rf"{L + 4} rows.*{L} layers.*expects {L + 1} rows"):
        import_reference_pt(path, model=model)


def test_reference_hidden_mismatch(model, tmp_path):
    path = tmp_path / "h.pt"
    torch.save(_ramp(L + 1, d=D + 2), path)
    with pytest.raises(VectorFileError, match=rf"size {D + 2}.*hidden_size is {D}"):
        import_reference_pt(path, model=model)


def test_reference_dict_with_one_tensor(tmp_path):
    path = tmp_path / "d.pt"
    torch.save({"vector": _ramp(L + 1)}, path)
    assert torch.equal(import_reference_pt(path).vectors, _ramp(L + 1)[1:])
    torch.save({"a": _ramp(L + 1), "b": _ramp(L + 1)}, path)
    with pytest.raises(VectorFileError, match="one tensor"):
        import_reference_pt(path)


class Evil:
    """Unpickling this would run code; weights_only must refuse it."""
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_reference_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"v": _ramp(L + 1), "obj": Evil()}, path)
    with pytest.raises(VectorFileError, match=r"evil.pt.*refused.*weights_only"):
        import_reference_pt(path)
    path2 = tmp_path / "cls.pt"
    torch.save(types.SimpleNamespace(v=_ramp(L + 1)), path2)
    with pytest.raises(VectorFileError, match=r"cls.pt.*refused"):
        import_reference_pt(path2)


def test_reference_bad_files(tmp_path):
    p = tmp_path / "junk.pt"
    p.write_bytes(b"not a torch file")
    with pytest.raises(VectorFileError, match="junk.pt.*not a readable"):
        import_reference_pt(p)
    with pytest.raises(VectorFileError, match="not found"):
        import_reference_pt(tmp_path / "missing.pt")
    torch.save(torch.ones(D), p)
    with pytest.raises(VectorFileError, match="2-D"):
        import_reference_pt(p)
    torch.save(torch.ones(L + 1, D, dtype=torch.long), p)
    with pytest.raises(VectorFileError, match="floating-point"):
        import_reference_pt(p)
    nan = _ramp(L + 1)
    nan[2, 3] = float("nan")
    torch.save(nan, p)
    with pytest.raises(VectorFileError, match="junk.pt.*non-finite"):
        import_reference_pt(p)


# ---------------------------------------------------------------- repeng objects

class FakeControlVector:
    def __init__(self, model_type, directions):
        self.model_type = model_type
        self.directions = directions


def test_from_repeng(model):
    a, b = _vec(1), _vec(2)
    pv = from_repeng(FakeControlVector("llama", {1: a, 3: b}), model=model, trait="happy")
    assert pv.trait == "happy" and pv.vectors.shape == (L, D)
    assert torch.equal(pv.vectors[1], torch.from_numpy(a)) and torch.equal(pv.vectors[3], torch.from_numpy(b))
    assert not pv.vectors[0].any() and not pv.vectors[2].any()
    assert pv.meta["source"]["layers"] == [1, 3] and pv.meta["model"] == model_fingerprint(model)
    free = from_repeng(FakeControlVector("llama", {np.int64(2): a}))
    assert free.vectors.shape == (3, D) and free.meta["model"]["model_type"] == "llama"


def test_from_repeng_errors(model):
    with pytest.raises(VectorFileError, match="negative layer key -1"):
        from_repeng(FakeControlVector("llama", {-1: _vec(1)}))
    with pytest.raises(VectorFileError, match="'qwen2'.*llama"):
        from_repeng(FakeControlVector("qwen2", {1: _vec(1)}), model=model)
    with pytest.raises(VectorFileError, match=rf"blocks \[{L}\]"):
        from_repeng(FakeControlVector("llama", {L: _vec(1)}), model=model)
    with pytest.raises(VectorFileError, match="hidden_size"):
        from_repeng(FakeControlVector("llama", {1: _vec(1, d=7)}), model=model)
    with pytest.raises(VectorFileError, match="different sizes"):
        from_repeng(FakeControlVector("llama", {1: _vec(1), 2: _vec(1, d=7)}))
    with pytest.raises(VectorFileError, match="directions"):
        from_repeng(object())


def test_to_repeng_round_trip(pv, model):
    v = pv.vectors.clone()
    v[2] = 0
    p = PersonaVector("x", v, pv.meta)
    mt, dirs = to_repeng_directions(p)
    assert mt == "llama" and sorted(dirs) == [0, 1, 3]
    assert all(d.dtype == np.float32 and d.shape == (D,) for d in dirs.values())
    back = from_repeng(FakeControlVector(mt, dirs), model=model, trait="x")
    assert torch.equal(back.vectors, v)
    mt, dirs = to_repeng_directions(p, layers=[3])
    assert sorted(dirs) == [3]
    with pytest.raises(VectorFileError, match="model_type"):
        to_repeng_directions(PersonaVector("t", torch.ones(2, 4)))
    assert to_repeng_directions(PersonaVector("t", torch.ones(2, 4)), model_type="gpt2")[0] == "gpt2"


def test_real_repeng(pv, model, tmp_path):
    repeng = pytest.importorskip("repeng")
    mt, dirs = to_repeng_directions(pv, layers=[1, 2, 3])
    cv = repeng.ControlVector(model_type=mt, directions=dirs)
    path = tmp_path / "real.gguf"
    cv.export_gguf(str(path))
    back = import_gguf(path, model=model)
    assert torch.equal(back.vectors[1:], pv.vectors[1:]) and not back.vectors[0].any()
    export_gguf(pv, tmp_path / "ours.gguf")
    cv2 = repeng.ControlVector.import_gguf(str(tmp_path / "ours.gguf"))
    assert cv2.model_type == "llama" and sorted(cv2.directions) == [1, 2, 3]
    assert torch.equal(from_repeng(cv2, model=model).vectors[1:], pv.vectors[1:])


# ---------------------------------------------------------------- dispatcher

def test_import_vector_dispatch(pv, model, tmp_path):
    export_gguf(pv, tmp_path / "a.gguf")
    export_reference_pt(pv, tmp_path / "a.pt")
    export_reference_pt(pv, tmp_path / "a.pth")
    pv.save(tmp_path / "a.safetensors")
    g = import_vector(tmp_path / "a.gguf", model=model)
    assert g.meta["source"]["format"] == "gguf-controlvector"
    for ext in ("pt", "pth"):
        r = import_vector(tmp_path / f"a.{ext}", model=model, trait="r")
        assert r.trait == "r" and torch.equal(r.vectors, pv.vectors)
    vs = import_vector(tmp_path / "a.safetensors", model=model)
    assert isinstance(vs, VectorSet) and torch.equal(vs["evil"].vectors, pv.vectors)
    assert torch.equal(import_vector(tmp_path / "a.safetensors", trait="evil").vectors, pv.vectors)
    # explicit format overrides the extension
    os.replace(tmp_path / "a.gguf", tmp_path / "a.bin")
    assert torch.equal(import_vector(tmp_path / "a.bin", format="repeng").vectors, g.vectors)
    with pytest.raises(VectorFileError, match=r"a.bin.*gguf.*reference.*safetensors"):
        import_vector(tmp_path / "a.bin")
    with pytest.raises(VectorFileError, match="unknown format 'onnx'"):
        import_vector(tmp_path / "a.bin", format="onnx")
