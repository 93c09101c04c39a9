"""benchmarks/judge_floor.py's prefix-cache simulation against hand-counted cases."""
from __future__ import annotations

import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location("judge_floor", Path(__file__).resolve().parents[1] / "benchmarks" / "judge_floor.py")
judge_floor = importlib.util.module_from_spec(spec)
spec.loader.exec_module(judge_floor)


def test_computed_tokens_of_a_block_cache():
    a = list(range(40))
    b = list(range(32)) + [99] * 10          # shares a's first two 16-token blocks
    c = [7] + list(range(1, 40))             # differs in its first token: shares nothing
    # a: all 40; b: 42 - 32; a again: 40 - 32 (its third block, 32..39, is partial: never cached);
    # c: all 40
    assert judge_floor.computed_with_cache([a, b, a, c], 16) == 40 + 10 + 8 + 40
    # whole blocks only, and the last token is always computed: a 32-token sequence seen twice
    # computes 32, then 1
    assert judge_floor.computed_with_cache([a[:32], a[:32]], 16) == 32 + 1
    # a block is reused only after every block before it is
    d = [5] * 16 + list(range(16, 40))       # second block equal to a's, first not
    assert judge_floor.computed_with_cache([a, d], 16) == 40 + 40
    assert judge_floor.computed_with_cache([a, b], 32) == 40 + 10
