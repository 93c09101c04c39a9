"""Where the token sequence a patched model is working on stands: its prompt, its length, and
the buffer its readings are written to.

A forward either starts a new sequence or continues the current one. That is decided from what
the caller hands the model, never from a guess about the tokens:

- ``generate()`` (patched, see :func:`personakern.patching.common.install_generate`) starts a
  new sequence at its first forward, whose prompt is the input it was given (its full width,
  left padding and any already cached prefix included); every later forward of the same call
  continues it. That covers cached decoding, ``use_cache=False`` (each forward re-feeds the
  whole sequence), a prompt prefilled in chunks and a prefilled prompt cache passed in.
- Outside ``generate()``, a forward continues the current sequence only when it is given the
  cache the current sequence wrote to (each cache is tagged with the sequence it holds) and that
  cache still ends where the sequence ends, for the same batch. Anything else (no cache, a fresh
  cache, a copy of an older cache, another batch size) starts a new sequence whose prompt is, by
  default, its first forward.
- :meth:`SequenceTracker.new_sequence` says it explicitly: the next forward starts a new
  sequence, optionally with per-row prompt ends (a teacher-forced prompt+response batch, or a
  prompt the caller feeds in several forwards).

Columns are absolute: column ``c`` is column ``c`` of ``generate()``'s output, left padding
included. Under ``torch.compile`` the cache is not tagged (dynamo cannot guard on it), so a
compiled forward outside ``generate()`` always starts a new sequence.
"""
from __future__ import annotations

import itertools
from typing import Optional, Union

import torch
from torch import Tensor

TAG = "_personakern_sequence"
FIRST_FORWARD = "first forward"   # new_sequence() without prompt lengths: the prompt is the first forward
_serials = itertools.count(1)  # process-wide: a cache tagged by an earlier patch never matches


class SequenceTracker:
    def __init__(self, device: torch.device):
        self.device = device
        self.serial = 0               # the current sequence (0: none yet)
        self.batch = 0
        self.past = 0                 # first column of the current forward
        self.seqlen = 0
        self.length = 0               # columns covered so far
        self.prompt_end: Optional[Tensor] = None      # [B] long: first response column per row
        self.pending: Union[None, str, int, Tensor] = None  # what new_sequence() asked for
        self.generating = False       # inside a patched generate() call
        self.buffer: Optional[Tensor] = None          # [B, capacity, Lm, M] readings
        self.valid: Optional[Tensor] = None           # [B, capacity] bool

    # ------------------------------------------------------------------ boundaries
    def new_sequence(self, prompt_lengths: Union[None, int, Tensor] = None) -> None:
        """The next forward starts a new sequence. ``prompt_lengths``: a ``[B]`` tensor of
        per-row prompt ends, an int for every row, or None (the whole first forward)."""
        self.pending = FIRST_FORWARD if prompt_lengths is None else prompt_lengths

    def begin(self, batch: int, seqlen: int, attention_mask: Optional[Tensor], cache) -> bool:
        """Place this forward; returns True if it starts a new sequence. Raises (and forgets the
        pending prompt lengths, so the next forward runs) if they do not fit the batch; nothing
        else changes then."""
        mask2d = attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[0] == batch
        if mask2d:
            past = attention_mask.shape[1] - seqlen
        elif cache is not None and hasattr(cache, "get_seq_length"):
            past = int(cache.get_seq_length())
        else:
            past = 0
        fresh = self.pending is not None or not self._continues(batch, past, cache)
        if fresh:
            pending, self.pending = self.pending, None
            if isinstance(pending, Tensor):
                if pending.shape != (batch,):
                    raise ValueError(f"prompt lengths were given for {pending.numel()} rows, but the batch "
                                     f"has {batch}; they are dropped (the next forward runs with the whole "
                                     f"first forward as the prompt)")
                ends = pending.to(self.device)
            else:
                width = pending if isinstance(pending, int) else past + seqlen
                ends = torch.full((batch,), width, dtype=torch.long, device=self.device)
            if not torch.compiler.is_compiling():  # only tags use it, and compiled forwards tag nothing
                self.serial = next(_serials)
            self.batch = batch
            self.prompt_end = ends
        self.past, self.seqlen = past, seqlen
        self.length = past + seqlen   # shorter than before only after the cache was cropped
        return fresh

    def _continues(self, batch: int, past: int, cache) -> bool:
        # the cheap tests first: under torch.compile each attribute read here becomes a guard
        if not self.generating and cache is None:
            return False
        if self.prompt_end is None or batch != self.batch:
            return False
        if self.generating:
            return True
        return past > 0 and past == self.length and getattr(cache, TAG, None) == self.serial

    def end(self, cache) -> None:
        """After the forward: tag the cache that now holds this sequence (the caller's, or the
        one the model created), so a later forward given it continues the sequence."""
        if cache is None or torch.compiler.is_compiling():
            return
        try:
            setattr(cache, TAG, self.serial)
        except (AttributeError, TypeError):  # a legacy tuple cache: later forwards start anew
            pass

    # ------------------------------------------------------------------ readings storage
    def prepare_buffer(self, fresh: bool, layers: int, traits: int, real: Tensor) -> None:
        end = self.past + self.seqlen
        if fresh or self.buffer is None or self.buffer.shape[2:] != (layers, traits):
            cap = end + 256
            self.buffer = torch.full((self.batch, cap, layers, traits), float("nan"), device=self.device)
            self.valid = torch.zeros(self.batch, cap, dtype=torch.bool, device=self.device)
        elif end > self.buffer.shape[1]:
            grow = max(end - self.buffer.shape[1], self.buffer.shape[1])
            self.buffer = torch.cat([self.buffer, self.buffer.new_full(
                (self.batch, grow, layers, traits), float("nan"))], dim=1)
            self.valid = torch.cat([self.valid, self.valid.new_zeros(self.batch, grow)], dim=1)
        self.valid[:, self.past:end] = real
        self.valid[:, end:] = False   # a cropped cache: what lay beyond is no longer the sequence

    def drop_buffer(self) -> None:
        self.buffer = self.valid = None

    def record(self, slot: int, readings: Tensor) -> None:
        view = readings.detach().view(self.batch, self.seqlen, -1)
        self.buffer[:, self.past:self.past + self.seqlen, slot] = view
