"""make_llm's environment while it builds an engine (a fake ``vllm.LLM`` records it; no engine
starts): the CPU KV cache gets a bounded default unless the user set one, the in-process switch
is set for the first engine only, and both are gone again afterwards, also when the build fails."""
from __future__ import annotations

import os

import pytest

from vllm_support import require_vllm

require_vllm()

from personakern.vllm import engine  # noqa: E402

KV, MP = engine.KV_SPACE_ENV, engine.MULTIPROCESSING_ENV


@pytest.fixture
def fake_llm(monkeypatch, tmp_path):
    import vllm
    seen = []

    class FakeLLM:
        fail = False

        def __init__(self, folder, **kwargs):
            seen.append({KV: os.environ.get(KV), MP: os.environ.get(MP), "kwargs": kwargs,
                         "environ": dict(os.environ)})
            if FakeLLM.fail:
                raise RuntimeError("engine build failed")

    monkeypatch.setattr(vllm, "LLM", FakeLLM)
    monkeypatch.delenv(KV, raising=False)
    monkeypatch.delenv(MP, raising=False)
    monkeypatch.setattr(engine, "_IN_PROCESS", type(engine._IN_PROCESS)())
    (tmp_path / "config.json").write_text("{}")
    return FakeLLM, seen, str(tmp_path)


def test_default_kv_space_is_bounded():
    gib = engine.default_cpu_kv_space()
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    assert 1 <= gib <= 8 and gib <= max(1, total / 4)


def test_cpu_engine_gets_the_default_and_the_environment_is_restored(fake_llm, monkeypatch):
    FakeLLM, seen, folder = fake_llm
    monkeypatch.setattr(engine, "_cpu_platform", lambda vllm: True)
    llm = engine.make_llm(folder)
    assert seen[-1][KV] == str(engine.default_cpu_kv_space()) and seen[-1][MP] == "0"
    assert KV not in os.environ and MP not in os.environ
    # a second engine while the first is open: its own process, the same KV default
    engine.make_llm(folder)
    assert seen[-1][KV] == str(engine.default_cpu_kv_space()) and seen[-1][MP] is None
    engine._IN_PROCESS.discard(llm)


def test_the_users_kv_space_wins_and_gpus_get_none(fake_llm, monkeypatch):
    FakeLLM, seen, folder = fake_llm
    monkeypatch.setattr(engine, "_cpu_platform", lambda vllm: True)
    monkeypatch.setenv(KV, "3")
    engine.make_llm(folder)
    assert seen[-1][KV] == "3" and os.environ[KV] == "3"
    monkeypatch.delenv(KV)
    monkeypatch.setattr(engine, "_cpu_platform", lambda vllm: False)
    engine._IN_PROCESS.clear()
    engine.make_llm(folder)
    assert seen[-1][KV] is None and KV not in os.environ


def test_a_failed_build_leaves_the_environment_as_it_was(fake_llm, monkeypatch):
    FakeLLM, seen, folder = fake_llm
    monkeypatch.setattr(engine, "_cpu_platform", lambda vllm: True)
    FakeLLM.fail = True
    with pytest.raises(RuntimeError, match="engine build failed"):
        engine.make_llm(folder)
    assert seen[-1][KV] is not None
    assert KV not in os.environ and MP not in os.environ and not len(engine._IN_PROCESS)


def test_the_callers_environment_is_in_force_while_building_and_restored(fake_llm, monkeypatch):
    FakeLLM, seen, folder = fake_llm
    monkeypatch.setattr(engine, "_cpu_platform", lambda vllm: True)
    monkeypatch.setenv("PK_TEST_KEEP", "old")
    monkeypatch.setenv("PK_TEST_DROP", "there")
    monkeypatch.delenv("PK_TEST_NEW", raising=False)
    names = ("PK_TEST_KEEP", "PK_TEST_DROP", "PK_TEST_NEW", KV)
    env = {"PK_TEST_KEEP": "new", "PK_TEST_DROP": None, "PK_TEST_NEW": "1", KV: "5"}
    llm = engine.make_llm(folder, env=dict(env))
    assert tuple(seen[-1]["environ"].get(k) for k in names) == ("new", None, "1", "5")
    assert tuple(os.environ.get(k) for k in names) == ("old", "there", None, None)
    engine._IN_PROCESS.discard(llm)
    FakeLLM.fail = True   # a failed build restores them too
    with pytest.raises(RuntimeError, match="engine build failed"):
        engine.make_llm(folder, env=dict(env))
    assert seen[-1]["environ"].get("PK_TEST_NEW") == "1"
    assert tuple(os.environ.get(k) for k in names) == ("old", "there", None, None)
