"""Sequence boundaries (where a prompt ends, which forwards continue a sequence) against plain
forward hooks that know each token's absolute column; a bad call that leaves the model usable;
in-place edits of a block output by another library's hook; two threads on one model."""
from __future__ import annotations

import contextlib
import copy
import threading

import pytest
import torch
from transformers import DynamicCache

import personakern
from conftest import VOCAB, tiny_model
from reference import capture_block_outputs

LAYER, ALPHA = 1, 3.0


def vector(seed=3):
    return torch.randn(2, 40, generator=torch.Generator().manual_seed(seed))


def ids(batch, length, seed=0):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@contextlib.contextmanager
def steer_from_column(model, vec, prompt_end, alpha=ALPHA, layer=LAYER):
    """The reference: add ``alpha * vec[layer]`` to block ``layer``'s output at every token whose
    absolute column is >= ``prompt_end`` (a response token), whatever the forward is. The column
    of a forward's first token is the cache length before it (read off the cache, or 0)."""
    start = {"col": 0}

    def pre(module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        start["col"] = 0 if cache is None else cache.get_seq_length()

    def hook(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        cols = start["col"] + torch.arange(out.shape[1])
        on = (cols >= prompt_end)[None, :, None]
        new = torch.where(on, out + (alpha * vec[layer]).to(out.dtype), out)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handles = [model.model.register_forward_pre_hook(pre, with_kwargs=True),
               model.model.layers[layer].register_forward_hook(hook)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def greedy(model, input_ids, n=6, **kw):
    with torch.no_grad():
        return model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, return_dict_in_generate=True,
                              output_logits=True, **kw)


def assert_same(got, ref):
    assert torch.equal(got.sequences, ref.sequences)
    for a, b in zip(got.logits, ref.logits):
        assert (a - b).abs().max() <= 1e-5


@pytest.mark.parametrize("use_cache", [False, True])
def test_response_steering_with_and_without_a_cache(use_cache):
    """use_cache=False re-feeds the whole sequence every step; the generated tokens are still the
    response (today's main steered nothing: every forward looked like a fresh prompt)."""
    model, vec, x = tiny_model("llama", layers=2), vector(), ids(2, 7)
    with steer_from_column(model, vec, prompt_end=7):
        ref = greedy(model, x, use_cache=use_cache)
    plain = greedy(model, x, use_cache=use_cache)
    with personakern.patch(model) as pk:
        pk.steer(vec, ALPHA, layers=LAYER, positions="response")
        got = greedy(model, x, use_cache=use_cache)
    assert_same(got, ref)
    assert (plain.logits[-1] - got.logits[-1]).abs().max() > 1e-3   # the steering did something


def test_no_cache_readings_equal_a_cached_run():
    model, vec, x = tiny_model("llama", layers=2), vector(), ids(2, 7)
    with personakern.patch(model) as pk:
        pk.steer(vec, ALPHA, layers=LAYER, positions="response")
        pk.monitor({"v": vec}, layers="all")
        greedy(model, x, use_cache=True)
        cached = pk.readings
        greedy(model, x, use_cache=False)
        uncached = pk.readings
    assert uncached.prompt_lengths.tolist() == [7, 7]
    torch.testing.assert_close(uncached.values, cached.values, atol=1e-5, rtol=1e-5, equal_nan=True)


def test_reused_prompt_cache_starts_a_new_sequence_each_time():
    """A system prompt prefilled once, a copy of its cache per question: each generate() is its
    own sequence whose prompt is its input (today's main kept the first call's prompt end and
    its reading columns)."""
    model, vec = tiny_model("llama", layers=2), vector()
    prefix = ids(2, 5, seed=1)
    questions = [ids(2, 4, seed=2), ids(2, 6, seed=3)]
    prefill = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=prefix, past_key_values=prefill, use_cache=True)
    refs = []
    for q in questions:
        full = torch.cat([prefix, q], dim=1)
        with steer_from_column(model, vec, prompt_end=full.shape[1]):
            refs.append(greedy(model, full, past_key_values=copy.deepcopy(prefill)))
    with personakern.patch(model) as pk:
        pk.steer(vec, ALPHA, layers=LAYER, positions="response")
        pk.monitor({"v": vec}, layers=[LAYER])
        for q, ref in zip(questions, refs):
            full = torch.cat([prefix, q], dim=1)
            got = greedy(model, full, past_key_values=copy.deepcopy(prefill))
            assert_same(got, ref)
            r = pk.readings
            assert r.prompt_lengths.tolist() == [full.shape[1]] * 2
            # the cached prefix was not computed in this call: no readings there, none stale
            assert torch.isnan(r.values[:, :5]).all() and not torch.isnan(r.values[:, 5:]).any()
            assert r.values.shape[1] == full.shape[1] + 5      # the last token is never fed back


@pytest.mark.parametrize("how", ["manual chunk, then generate", "generate(prefill_chunk_size=4)"])
def test_prompt_fed_in_two_chunks_is_all_prompt(how):
    model, vec, x = tiny_model("llama", layers=2), vector(), ids(2, 9, seed=4)
    kw = {}
    with steer_from_column(model, vec, prompt_end=9):
        ref = greedy(model, x)
    with personakern.patch(model) as pk:
        pk.steer(vec, ALPHA, layers=LAYER, positions="response")
        pk.monitor({"v": vec}, layers=[LAYER])
        if how.startswith("manual"):
            cache = DynamicCache(config=model.config)
            with torch.no_grad():
                model(input_ids=x[:, :4], past_key_values=cache, use_cache=True)
            kw["past_key_values"] = cache
        else:
            kw["prefill_chunk_size"] = 4
        got = greedy(model, x, **kw)
        assert pk.readings.prompt_lengths.tolist() == [9, 9]
    assert_same(got, ref)


def test_explicit_new_sequence_for_forwards_called_directly():
    """A prompt fed by hand in two forwards, then decoded by hand: new_sequence(prompt_lengths)
    says where the prompt ends, the cache says the later forwards continue it."""
    model, vec, x = tiny_model("llama", layers=2), vector(), ids(2, 9, seed=5)

    def decode(steps=3):
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(input_ids=x[:, :5], past_key_values=cache, use_cache=True)
            out = model(input_ids=x[:, 5:], past_key_values=cache, use_cache=True)
            logits = [out.logits[:, -1]]
            for _ in range(steps):
                out = model(input_ids=logits[-1].argmax(-1, keepdim=True), past_key_values=cache, use_cache=True)
                logits.append(out.logits[:, -1])
        return torch.stack(logits)

    with steer_from_column(model, vec, prompt_end=9):
        ref = decode()
    with personakern.patch(model) as pk:
        pk.steer(vec, ALPHA, layers=LAYER, positions="response")
        pk.new_sequence(prompt_lengths=9)
        got = decode()
        assert pk._state.seq.prompt_end.tolist() == [9, 9]
        # without new_sequence the first forward is the prompt: the second chunk is "response"
        default = decode()
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert (default[0] - ref[0]).abs().max() > 1e-3


def test_a_continued_cache_keeps_its_readings_and_a_copy_does_not():
    model, vec, x = tiny_model("llama", layers=2), vector(), ids(1, 6, seed=6)
    with personakern.patch(model) as pk:
        pk.monitor({"v": vec}, layers=[0])
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(input_ids=x[:, :4], past_key_values=cache, use_cache=True)
            twin = copy.deepcopy(cache)
            model(input_ids=x[:, 4:], past_key_values=cache, use_cache=True)
            whole = pk.readings
            assert whole.values.shape[1] == 6 and not torch.isnan(whole.values).any()
            assert whole.prompt_lengths.tolist() == [4]              # later forwards: response
            model(input_ids=x[:, 4:5], past_key_values=twin, use_cache=True)   # ends at 4, not 6
            again = pk.readings
    assert again.values.shape[1] == 5 and torch.isnan(again.values[:, :4]).all()
    assert again.prompt_lengths.tolist() == [5]


def test_bad_prompt_lengths_fail_once_and_leave_the_model_usable():
    model, x = tiny_model("llama", layers=2), ids(1, 5)
    with torch.no_grad():
        ref = model(input_ids=x).logits
    with personakern.patch(model) as pk:
        pk.set_prompt_lengths([3, 4])
        with pytest.raises(ValueError, match="2 rows, but the batch has 1"):
            with torch.no_grad():
                model(input_ids=x)
        with torch.no_grad():
            after = model(input_ids=x).logits      # the lengths were dropped: an ordinary forward
        assert pk._state.seq.pending is None
    torch.testing.assert_close(after, ref, atol=1e-5, rtol=1e-5)
    for bad in ([[1, 2]], [1.5], [-1], -2, []):
        with personakern.patch(model) as pk, pytest.raises(ValueError, match="prompt_lengths"):
            pk.new_sequence(bad)


@pytest.mark.parametrize("backend", ["native", "cpu"])
def test_in_place_edit_of_a_block_output_is_seen_by_the_next_block(backend):
    """steering-vectors and nnsight edit block outputs in place; the next block must normalise
    the edited values, not the stashed norm of the unedited ones."""
    if backend not in personakern.ops.available_backends("cpu"):
        pytest.skip(f"{backend} backend unavailable")
    model, x = tiny_model("llama", layers=3), ids(2, 6, seed=7)
    push = vector(8)[0]

    def in_place(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        out[None] += 2.0 * push          # what steering-vectors' hook does
        return None                      # same object, edited

    def run():
        h = model.model.layers[1].register_forward_hook(in_place)
        try:
            with capture_block_outputs(model) as outs, torch.no_grad():
                logits = model(input_ids=x).logits
        finally:
            h.remove()
        return logits, outs

    ref, ref_outs = run()
    with personakern.patch(model, backend=backend):
        got, got_outs = run()
    torch.testing.assert_close(got_outs[2][0], ref_outs[2][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        plain = model(input_ids=x).logits
    assert (plain - ref).abs().max() > 1e-3


def test_two_threads_on_one_model_get_a_clear_error():
    model, vec, x = tiny_model("llama", layers=2), vector(), ids(2, 5, seed=9)
    with steer_from_column(model, vec, prompt_end=0, alpha=1.0):
        ref = greedy(model, x)
    inside, release = threading.Event(), threading.Event()
    results: dict = {}

    def wait_once(module, args, output):
        if not inside.is_set():
            inside.set()
            release.wait(30)

    with personakern.patch(model) as pk:
        pk.steer(vec, 1.0, layers=LAYER)
        hook = model.model.layers[0].register_forward_hook(wait_once)

        def first():
            results["first"] = greedy(model, x)

        t = threading.Thread(target=first)
        t.start()
        assert inside.wait(30)
        for call in (lambda: greedy(model, x), lambda: model(input_ids=x),
                     lambda: pk.steer(vec, 5.0, layers=LAYER), lambda: pk.monitor({"v": vec})):
            with pytest.raises(RuntimeError, match="running in another thread"):
                call()
        release.set()
        t.join(60)
        hook.remove()
        assert pk.steering["vector"]["alpha"] == [1.0]   # the refused steer() changed nothing
        greedy(model, x)                                  # free again once the first returned
    assert_same(results["first"], ref)


def test_in_place_edit_under_torch_compile():
    """Compiled, the version counter is not traced: a hook between two blocks turns the fusion
    off there instead."""
    import torch._dynamo
    torch._dynamo.reset()
    model, x = tiny_model("llama", layers=3), ids(2, 6, seed=7)
    push = vector(8)[0]

    def in_place(module, args, output):
        output[None] += 2.0 * push
        return None

    h = model.model.layers[1].register_forward_hook(in_place)
    try:
        with torch.no_grad():
            ref = model(input_ids=x).logits
        with personakern.patch(model) as pk, torch.no_grad():
            pk.monitor({"v": torch.randn(3, 40)}, layers="all")
            got = torch.compile(model, fullgraph=True, backend="aot_eager")(input_ids=x).logits
    finally:
        h.remove()
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_in_place_edit_under_inference_mode():
    """Inference tensors have no version counter: a hook between two blocks turns the fusion off."""
    model, x = tiny_model("llama", layers=3), ids(2, 6, seed=7)
    push = vector(8)[0]

    def in_place(module, args, output):
        output[None] += 2.0 * push
        return None

    h = model.model.layers[1].register_forward_hook(in_place)
    try:
        with torch.inference_mode():
            ref = model(input_ids=x).logits
            with personakern.patch(model):
                got = model(input_ids=x).logits
                h.remove()
                unhooked = model(input_ids=x).logits   # no hook: fused again, and no error
    finally:
        h.remove()
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert (unhooked - ref).abs().max() > 1e-3
