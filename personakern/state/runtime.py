"""Two guards of the patched engine that are not about steering or monitoring: the stash that
hands block l's fused RMSNorm to block l+1, and the one-thread-at-a-time guard."""
from __future__ import annotations

import threading
from typing import Optional

import torch
from torch import Tensor


def version_blind() -> bool:
    """True where a tensor's version counter cannot be read: under torch.compile (dynamo does not
    trace it) and for inference-mode tensors (which have none)."""
    return torch.compiler.is_compiling() or torch.is_inference_mode_enabled()


class NormStash:
    """Block l's fused output op also computes block l+1's input RMSNorm; block l+1 takes it
    when it receives that very tensor, unedited. An in-place edit in between (another
    library's forward hook writing ``out[...] = ...``) bumps the tensor's version counter, and
    the norm is computed afresh."""

    def __init__(self):
        self.item: Optional[tuple[Tensor, int, Tensor]] = None

    def put(self, out: Tensor, normed: Tensor) -> None:
        self.item = (out, None if version_blind() else out._version, normed)

    def take(self, hidden: Tensor) -> Optional[Tensor]:
        item, self.item = self.item, None
        if item is not None and item[0] is hidden and (item[1] is None or hidden._version == item[1]):
            return item[2]
        return None

    def clear(self) -> None:
        self.item = None


class ThreadGuard:
    """One patched model runs one ``generate()`` or forward at a time: its steering tables, the
    sequence and the readings are one state per model, so a second thread would silently mix
    its alphas and readings with the first one's. The second thread gets a clear error instead
    (the same thread may nest: ``generate()`` calls the forward)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._owner: Optional[int] = None
        self._depth = 0

    def enter(self, what: str) -> None:
        me = threading.get_ident()
        with self._lock:
            if self._owner is not None and self._owner != me:
                raise RuntimeError(
                    f"personakern: {what} while this patched model is running in another thread; its "
                    f"steering, sequence and readings are one state per model. Run one generate()/forward "
                    f"at a time, or give each thread its own model (and patch)")
            self._owner = me
            self._depth += 1

    def exit(self) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth == 0:
                self._owner = None

    def check(self, what: str) -> None:
        """For a call that changes the state: refused while another thread runs the model."""
        with self._lock:
            if self._owner is not None and self._owner != threading.get_ident():
                raise RuntimeError(f"personakern: {what} while this patched model is running in another "
                                   f"thread; wait for its generate()/forward to return")
