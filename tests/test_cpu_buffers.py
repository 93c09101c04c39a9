"""The CPU backend's pool of large outputs (csrc/cpu/buffers.h): reused only when nothing else
holds them, never while a caller keeps an output, a view of it or its storage."""
import gc

import pytest
import torch

from personakern.backends import cpu, native

pytestmark = pytest.mark.skipif(not cpu.available(), reason="cpu extension unavailable")

N, D = 512, 1024  # 2 MiB of float32 per output: above the pool's 1 MiB floor


@pytest.fixture
def pool():
    before = cpu.buffers()["limit_mb"]
    gc.collect()        # outputs of earlier tests caught in reference cycles
    cpu.buffers(0)      # start empty
    cpu.buffers(256)
    yield
    cpu.buffers(before)


def _inputs(seed, n=N, d=D):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g), torch.randn(n, d, generator=g), 1 + 0.1 * torch.randn(d, generator=g),
            torch.randn(3, d, generator=g))


def _op(h, x, w, ro):
    return cpu.add_rms_norm_steer_project(h, x, w, 1e-5, False, readout=ro)


def test_dropped_outputs_are_reused_and_results_stay_right(pool):
    h, x, w, ro = _inputs(0)
    normed, r, _ = _op(h, x, w, ro)
    ptrs = {normed.data_ptr(), r.data_ptr()}
    del normed, r
    stats = cpu.buffers()
    h2, x2, w2, ro2 = _inputs(1)
    normed, r, readings = _op(h2, x2, w2, ro2)
    assert {normed.data_ptr(), r.data_ptr()} == ptrs            # the same memory, reused
    assert cpu.buffers()["reused"] == stats["reused"] + 2
    ref = native.add_rms_norm_steer_project(h2, x2, w2, 1e-5, False, readout=ro2)
    assert torch.equal(normed, ref[0]) and torch.equal(r, ref[1])
    torch.testing.assert_close(readings, ref[2], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("keep", ["tensor", "view", "storage", "list"])
def test_an_output_somebody_holds_is_never_overwritten(pool, keep):
    h, x, w, ro = _inputs(2)
    normed, r, _ = _op(h, x, w, ro)
    expected = r.clone()
    held = {"tensor": lambda t: t, "view": lambda t: t[3:7], "storage": lambda t: t.untyped_storage(),
            "list": lambda t: [t.view(-1)]}[keep](r)
    ptr = r.data_ptr()
    del r, normed
    for seed in (3, 4, 5):  # more calls than the pool needs to cycle
        out = _op(*_inputs(seed))
        assert out[1].data_ptr() != ptr and out[0].data_ptr() != ptr
        del out
    if keep == "storage":
        got = torch.empty(0).set_(held).view(N, D)
    else:
        got = {"tensor": lambda: held, "view": lambda: None, "list": lambda: held[0].view(N, D)}[keep]()
    if got is None:
        assert torch.equal(held, expected[3:7])
    else:
        assert torch.equal(got, expected)


def test_limit_zero_switches_pooling_off_and_a_lower_limit_releases(pool):
    out = _op(*_inputs(6))
    del out
    assert cpu.buffers()["held_mb"] >= 2 * N * D * 4 / 2 ** 20
    assert cpu.buffers(0)["held_mb"] == 0
    fresh = cpu.buffers()["fresh"]
    for seed in (7, 8):
        out = _op(*_inputs(seed))
        del out
    stats = cpu.buffers()
    assert stats["entries"] == 0 and stats["fresh"] == fresh  # not pooled: not counted either
    with pytest.raises(ValueError):
        cpu.buffers(-1)
    with pytest.raises(ValueError):
        cpu.buffers(float("nan"))


def test_small_outputs_bypass_the_pool(pool):
    before = cpu.buffers()
    out = _op(*_inputs(9, n=4, d=64))
    del out
    after = cpu.buffers()
    assert (after["reused"], after["fresh"], after["entries"]) == (before["reused"], before["fresh"], before["entries"])


def test_patched_model_hidden_states_survive_reuse(pool):
    """output_hidden_states keeps every block output: none may be overwritten by a later block,
    so all of them equal the unpatched model's, and the pool really was used."""
    transformers = pytest.importorskip("transformers")
    import personakern
    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (2, 640))  # 1280 rows x 256 x 4 B = 1.25 MiB per block output
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True).hidden_states
        handle = personakern.patch(model, backend="cpu")
        stats = cpu.buffers()
        try:
            first = model(ids, output_hidden_states=True).hidden_states
            second = model(ids, output_hidden_states=True).hidden_states
            plain = model(ids).logits
        finally:
            handle.unpatch()
    assert cpu.buffers()["reused"] > stats["reused"]
    for got in (first, second):
        assert len(got) == len(ref)
        for a, b in zip(got, ref):
            assert torch.equal(a, b)
    with torch.no_grad():
        assert torch.equal(plain, model(ids).logits)


def test_a_pooled_output_resizes_like_any_tensor(pool):
    _, r, _ = _op(*_inputs(10))
    head = r[:2].clone()
    r.resize_(2 * N, D)           # grows: its data moves to ordinary memory, the block goes back
    assert torch.equal(r[:2], head)
    r.resize_(4, D)
    assert torch.equal(r[:2], head)
