import json
import os
import warnings

import pytest
import torch
import transformers
from safetensors.torch import save_file

from personakern.vectors import (
    FORMAT_NAME,
    LAYER_CONVENTION,
    PersonaVector,
    VectorFileError,
    VectorSet,
    as_layer_tensor,
    check_fingerprint,
    load_vectors,
    model_fingerprint,
)

NOT_ST = "not a valid safetensors file"


def llama_config(hidden=16, layers=3, name=None):
    cfg = transformers.LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=32,
                                   num_attention_heads=2, num_key_value_heads=1, vocab_size=100)
    if name:
        cfg._name_or_path = name
    return cfg


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(llama_config(name="org/tiny-llama")).eval()


def make_pv(trait="evil", layers=3, hidden=16, cfg=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    meta = {"averaged_over": "response", "n_positive": 5, "n_negative": 4, "judge": "x", "source": "test"}
    if cfg is not None:
        meta["model"] = model_fingerprint(cfg)
    return PersonaVector(trait, torch.randn(layers, hidden, generator=g), meta)


def good_metadata(traits):
    md = {"format": FORMAT_NAME, "format_version": "1", "layer_convention": LAYER_CONVENTION,
          "library_version": "test", "traits": json.dumps(traits)}
    md.update({f"meta.{t}": "{}" for t in traits})
    return md


# ------------------------------------------------------------------ fingerprints

def test_fingerprint_fields(model):
    fp = model_fingerprint(model)
    assert fp == model_fingerprint(model.config)
    assert fp == {"model_type": "llama", "hidden_size": 16, "num_hidden_layers": 3, "vocab_size": 100,
                  "intermediate_size": 32, "num_attention_heads": 2, "name_or_path": "org/tiny-llama"}


def test_fingerprint_uses_text_config():
    cfg = transformers.Gemma3Config(text_config={"hidden_size": 24, "num_hidden_layers": 2,
                                                 "intermediate_size": 48, "num_attention_heads": 2})
    fp = model_fingerprint(cfg)
    assert fp["hidden_size"] == 24 and fp["num_hidden_layers"] == 2
    assert fp["model_type"] == "gemma3_text"


def test_check_fingerprint_hard_and_soft(model):
    fp = model_fingerprint(model)
    check_fingerprint(dict(fp), model, "f")  # identical: silent
    with pytest.raises(VectorFileError, match=r"hidden_size: file has 32, model has 16") as ei:
        check_fingerprint({**fp, "hidden_size": 32, "num_hidden_layers": 9}, model, "myfile")
    assert "num_hidden_layers: file has 9, model has 3" in str(ei.value) and "myfile" in str(ei.value)
    with pytest.warns(UserWarning, match="name_or_path"):
        check_fingerprint({**fp, "name_or_path": "org/base"}, model, "f")
    with pytest.warns(UserWarning, match="vocab_size"):
        check_fingerprint({**fp, "vocab_size": 7}, model, "f")


# ------------------------------------------------------------------ PersonaVector basics

def test_construction_converts_and_properties():
    pv = PersonaVector("t", torch.ones(3, 4, dtype=torch.float64) * 2)
    assert pv.vectors.dtype == torch.float32 and pv.vectors.is_contiguous()
    assert (pv.num_layers, pv.hidden_size) == (3, 4)
    assert torch.allclose(pv.norms(), torch.full((3,), 4.0))
    assert torch.allclose(pv.unit(1), torch.full((4,), 0.5))
    assert torch.equal(pv[2], pv.vectors[2])
    with pytest.raises(IndexError):
        pv[3]
    with pytest.raises(IndexError):
        pv[-1]


@pytest.mark.parametrize("bad", [torch.zeros(3), torch.zeros(2, 3, 4), torch.zeros(3, 4, dtype=torch.int64),
                                 torch.zeros(0, 4)])
def test_construction_rejects_bad_tensors(bad):
    with pytest.raises(VectorFileError, match="trait 'x'"):
        PersonaVector("x", bad)


@pytest.mark.parametrize("val", [float("nan"), float("inf"), float("-inf")])
def test_construction_rejects_nonfinite(val):
    v = torch.zeros(4, 8)
    v[1, 3] = val
    v[3, 0] = val
    with pytest.raises(VectorFileError, match=r"trait 'sad'.*non-finite.*layers \[1, 3\]"):
        PersonaVector("sad", v)


def test_float64_overflow_to_inf_rejected():
    with pytest.raises(VectorFileError, match="non-finite"):
        PersonaVector("x", torch.full((2, 2), 1e300, dtype=torch.float64))


# ------------------------------------------------------------------ round trips

def test_roundtrip_bit_exact(tmp_path, model):
    pv = make_pv(cfg=model)
    pv.vectors[0, 0] = 1e-40  # subnormal survives too
    p = tmp_path / "evil.safetensors"
    pv.save(p)
    back = PersonaVector.load(p, model=model)
    assert back.trait == "evil"
    assert torch.equal(back.vectors.view(torch.int32), pv.vectors.view(torch.int32))
    assert back.meta == pv.meta
    # and via a str path / without a model
    assert torch.equal(PersonaVector.load(str(p)).vectors, pv.vectors)


def test_file_metadata_layout(tmp_path):
    from safetensors import safe_open
    p = tmp_path / "v.safetensors"
    make_pv("a.b-c_1").save(p)
    with safe_open(str(p), framework="pt") as f:
        md = f.metadata()
        assert list(f.keys()) == ["persona.a.b-c_1"]
        assert f.get_tensor("persona.a.b-c_1").dtype == torch.float32
    assert md["format"] == "personakern.vectors" and md["format_version"] == "1"
    assert md["layer_convention"] == "block_output_0based"
    assert md["library_version"]
    assert json.loads(md["traits"]) == ["a.b-c_1"]
    assert json.loads(md["meta.a.b-c_1"])["n_positive"] == 5


def test_vectorset_two_traits(tmp_path, model):
    vs = VectorSet([make_pv("zeta", cfg=model, seed=1), make_pv("alpha", cfg=model, seed=2)])
    p = tmp_path / "set.safetensors"
    vs.save(p)
    back = load_vectors(p, model=model)
    assert back.traits == ["zeta", "alpha"]  # order kept
    assert list(back) == ["zeta", "alpha"] and len(back) == 2 and "alpha" in back
    for t in vs.traits:
        assert torch.equal(back[t].vectors, vs[t].vectors)
        assert back[t].meta == vs[t].meta
    assert VectorSet.load(p).traits == back.traits


def test_vectorset_add_errors():
    vs = VectorSet([make_pv("a")])
    with pytest.raises(VectorFileError, match="already"):
        vs.add(make_pv("a"))
    with pytest.raises(VectorFileError, match=r"shape mismatch.*\[3, 8\]"):
        vs.add(make_pv("b", hidden=8))
    with pytest.raises(KeyError, match="available traits"):
        vs["nope"]


# ------------------------------------------------------------------ model mismatch

@pytest.mark.parametrize("cfg,field", [
    (llama_config(hidden=32), "hidden_size"),
    (llama_config(layers=5), "num_hidden_layers"),
    (transformers.Qwen2Config(hidden_size=16, num_hidden_layers=3, intermediate_size=32, num_attention_heads=2,
                              num_key_value_heads=1, vocab_size=100), "model_type"),
])
def test_load_for_different_model_raises(tmp_path, model, cfg, field):
    p = tmp_path / "v.safetensors"
    make_pv(layers=cfg.num_hidden_layers, hidden=cfg.hidden_size, cfg=cfg).save(p)
    with pytest.raises(VectorFileError, match=field) as ei:
        PersonaVector.load(p, model=model)
    assert str(p) in str(ei.value)


def test_shape_checked_against_model_without_fingerprint(tmp_path, model):
    p = tmp_path / "v.safetensors"
    make_pv(hidden=8).save(p)  # no "model" in meta
    with pytest.raises(VectorFileError, match=r"\[3, 8\].*\[3, 16\]"):
        load_vectors(p, model=model)


def test_name_or_path_difference_only_warns(tmp_path, model):
    p = tmp_path / "v.safetensors"
    make_pv(cfg=llama_config(name="org/base-model")).save(p)
    with pytest.warns(UserWarning, match="name_or_path"):
        pv = PersonaVector.load(p, model=model)
    assert pv.num_layers == 3


def test_same_model_no_warning(tmp_path, model):
    p = tmp_path / "v.safetensors"
    make_pv(cfg=model).save(p)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PersonaVector.load(p, model=model)


# ------------------------------------------------------------------ bad files

@pytest.mark.parametrize("val", [float("nan"), float("inf")])
def test_nonfinite_file_rejected(tmp_path, val):
    v = torch.zeros(3, 16)
    v[2, 5] = val
    p = tmp_path / "bad.safetensors"
    save_file({"persona.x": v}, str(p), metadata=good_metadata(["x"]))
    with pytest.raises(VectorFileError, match=r"non-finite.*layers \[2\]") as ei:
        load_vectors(p)
    assert str(p) in str(ei.value) and "'x'" in str(ei.value)


def test_truncated_file(tmp_path):
    p = tmp_path / "v.safetensors"
    make_pv().save(p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(VectorFileError, match=NOT_ST):
        load_vectors(p)
    p.write_bytes(data[:-1])  # header intact, one data byte short
    with pytest.raises(VectorFileError, match=NOT_ST):
        load_vectors(p)


def test_random_bytes_text_and_tiny_files(tmp_path):
    cases = {"rand.safetensors": os.urandom(4096), "text.safetensors": b"hello, this is not a tensor file\n" * 20,
             "tiny.safetensors": b"abc", "empty.safetensors": b""}
    for name, data in cases.items():
        p = tmp_path / name
        p.write_bytes(data)
        with pytest.raises(VectorFileError, match=NOT_ST) as ei:
            load_vectors(p)
        assert str(p) in str(ei.value)


def test_torch_pickle_file_rejected(tmp_path):
    class Boom:  # would run code if unpickled
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    p = tmp_path / "v.pt"
    torch.save({"persona.x": torch.zeros(3, 16), "boom": Boom()}, p)
    with pytest.raises(VectorFileError, match=NOT_ST):
        PersonaVector.load(p)
    assert not (tmp_path / "pwned").exists()


def test_safetensors_without_metadata(tmp_path):
    p = tmp_path / "plain.safetensors"
    save_file({"persona.x": torch.zeros(3, 16)}, str(p))
    with pytest.raises(VectorFileError, match="not a personakern vector file"):
        load_vectors(p)


def test_missing_path(tmp_path):
    p = tmp_path / "nope.safetensors"
    with pytest.raises(VectorFileError, match="not found") as ei:
        load_vectors(p)
    assert str(p) in str(ei.value)
    with pytest.raises(VectorFileError, match="not a regular file"):
        load_vectors(tmp_path)


@pytest.mark.parametrize("key,value,msg", [
    ("layer_convention", "hidden_states_index", "layer_convention"),
    ("format_version", "2", "unsupported format_version"),
    ("traits", "not json", "traits"),
    ("meta.x", "[1, 2]", "meta.x"),
])
def test_bad_header_fields(tmp_path, key, value, msg):
    md = good_metadata(["x"])
    md[key] = value
    p = tmp_path / "v.safetensors"
    save_file({"persona.x": torch.zeros(3, 16)}, str(p), metadata=md)
    with pytest.raises(VectorFileError, match=msg):
        load_vectors(p)


def test_missing_tensor_for_listed_trait(tmp_path):
    p = tmp_path / "v.safetensors"
    save_file({"persona.x": torch.zeros(3, 16)}, str(p), metadata=good_metadata(["x", "y"]))
    with pytest.raises(VectorFileError, match="'persona.y' is missing"):
        load_vectors(p)


def test_shape_mismatch_among_traits_in_file(tmp_path):
    p = tmp_path / "v.safetensors"
    save_file({"persona.x": torch.zeros(3, 16), "persona.y": torch.zeros(3, 8)}, str(p),
              metadata=good_metadata(["x", "y"]))
    with pytest.raises(VectorFileError, match="shape mismatch"):
        load_vectors(p)


# ------------------------------------------------------------------ trait selection

def test_trait_selection(tmp_path):
    p = tmp_path / "set.safetensors"
    VectorSet([make_pv("a"), make_pv("b", seed=3)]).save(p)
    with pytest.raises(VectorFileError, match=r"2 traits \['a', 'b'\].*trait="):
        PersonaVector.load(p)
    with pytest.raises(VectorFileError, match=r"'c' not in file.*\['a', 'b'\]"):
        PersonaVector.load(p, trait="c")
    assert PersonaVector.load(p, trait="b").trait == "b"


# ------------------------------------------------------------------ atomic saving

def test_save_leaves_no_temp_files(tmp_path):
    p = tmp_path / "v.safetensors"
    make_pv().save(p)
    make_pv(seed=5).save(p)  # overwrite
    assert os.listdir(tmp_path) == ["v.safetensors"]
    assert torch.equal(PersonaVector.load(p).vectors, make_pv(seed=5).vectors)
    assert os.stat(p).st_mode & 0o777 != 0o600  # not mkstemp's private mode


@pytest.mark.parametrize("bad", [
    lambda: VectorSet([make_pv("ok"), make_pv("bad name/")]),
    lambda: VectorSet([make_pv("")]),
    lambda: PersonaVector("ok", torch.zeros(3, 16), {"x": object()}),
    lambda: PersonaVector("ok", torch.zeros(3, 16), {"x": float("nan")}),
    lambda: VectorSet(),
])
def test_failed_save_keeps_existing_file(tmp_path, bad):
    p = tmp_path / "v.safetensors"
    make_pv().save(p)
    before = p.read_bytes()
    with pytest.raises(VectorFileError):
        bad().save(p)
    assert p.read_bytes() == before
    assert os.listdir(tmp_path) == ["v.safetensors"]


def test_save_into_missing_folder(tmp_path):
    with pytest.raises(VectorFileError, match="cannot write"):
        make_pv().save(tmp_path / "no" / "such" / "v.safetensors")


# ------------------------------------------------------------------ as_layer_tensor

def test_as_layer_tensor_ok():
    pv = make_pv()
    assert as_layer_tensor(pv, 3, 16) is pv.vectors
    t = as_layer_tensor(torch.ones(3, 16, dtype=torch.bfloat16), 3, 16)
    assert t.dtype == torch.float32 and t.shape == (3, 16)


def test_as_layer_tensor_errors():
    with pytest.raises(VectorFileError, match=r"steer: expected \[30, 576\], got \[30, 64\]"):
        as_layer_tensor(torch.zeros(30, 64), 30, 576, name="steer")
    with pytest.raises(VectorFileError, match=r"expected \[3, 16\], got \[16\]"):
        as_layer_tensor(torch.zeros(16), 3, 16)
    with pytest.raises(VectorFileError, match="floating"):
        as_layer_tensor(torch.zeros(3, 16, dtype=torch.int32), 3, 16)
    bad = torch.zeros(3, 16)
    bad[1, 1] = float("nan")
    with pytest.raises(VectorFileError, match=r"non-finite.*\[1\]"):
        as_layer_tensor(bad, 3, 16)
    with pytest.raises(VectorFileError, match="torch.Tensor"):
        as_layer_tensor([[0.0] * 16] * 3, 3, 16)
    assert issubclass(VectorFileError, ValueError)
