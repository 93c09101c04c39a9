"""Helpers every command module uses; they import this, never each other (imports point down)."""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager


@contextmanager
def step(label: str):
    """Print ``label``, run the block, print its wall time (to stderr: stdout stays the result)."""
    t0 = time.perf_counter()
    print(f"• {label} ...", end="", flush=True, file=sys.stderr)
    yield
    print(f" {time.perf_counter() - t0:.2f} s", file=sys.stderr, flush=True)


def load_model_of(args):
    """``(model, tokenizer)`` of ``--model``."""
    import personakern
    with step(f"loading model {args.model}"):
        return personakern.load_model(args.model)
