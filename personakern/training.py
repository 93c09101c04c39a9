"""Preventative steering: steer with frozen persona vectors while fine-tuning.

The paper's item 5 (docs/design.md#the-method, step 5): during fine-tuning, add ``+alpha * v_l``
to the output of decoder block ``l`` (0-based, ``model.model.layers[l]``) so the optimiser has no
reason to move the weights toward the trait; remove it at inference. The steering runs inside
the fused op, and autograd flows through ``hidden`` only: the vectors are constants, so they
never get gradients while the model's (or LoRA's) weights do.

Two entry points:

* :func:`preventative_steering` - a context manager around a training loop::

      with personakern.preventative_steering(model, vectors["evil"], alpha=4.0):
          for batch in loader:
              model(**batch).loss.backward(); opt.step(); opt.zero_grad()

* :class:`PreventativeSteeringCallback` - the same for ``transformers.Trainer``.

Both accept a plain ``transformers`` model, a PEFT model (``get_peft_model(...)``; the wrapped
base model is patched), or a :class:`~personakern.handle.PersonaHandle`. A model that is already
patched is reused through its handle, so patching before or after ``get_peft_model`` both work.
On exit the steering they added is removed, and the model is unpatched only if they patched it:
the model computes exactly what it computed before.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence, Union

from torch import Tensor, nn

from .handle import Layers, PersonaHandle, patch
from .patching import find_decoder, is_patched
from .patching.common import ATTR
from .state import POSITION_MODES
from .vectors import PersonaVector, VectorSet

PREFIX = "preventative/"

Vectors = Union[PersonaVector, Tensor, VectorSet, Mapping[str, Union[PersonaVector, Tensor]], Sequence[PersonaVector]]


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (``PeftModel.get_base_model()``), else ``model``."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def _named(vectors: Vectors) -> dict:
    if isinstance(vectors, (PersonaVector, Tensor)):
        name = vectors.trait if isinstance(vectors, PersonaVector) else "vector"
        return {name: vectors}
    if isinstance(vectors, Mapping):
        out = dict(vectors.items())
    elif isinstance(vectors, (list, tuple)) and all(isinstance(v, PersonaVector) for v in vectors):
        out = {v.trait: v for v in vectors}
        if len(out) != len(vectors):
            raise ValueError(f"two vectors share a trait name: {[v.trait for v in vectors]}")
    else:
        raise TypeError("vectors must be a PersonaVector, a [num_layers, hidden] tensor, a VectorSet, "
                        f"a mapping name -> vector or a list of PersonaVectors; got {type(vectors).__name__}")
    if not out:
        raise ValueError("no vectors given")
    for k, v in out.items():
        if not isinstance(v, (PersonaVector, Tensor)):
            raise TypeError(f"vector {k!r}: expected a PersonaVector or a tensor, got {type(v).__name__}")
    return out


def _alphas(alpha, names: list) -> dict:
    given = dict(alpha) if isinstance(alpha, Mapping) else {n: alpha for n in names}
    unknown = set(given) - set(names)
    missing = set(names) - set(given)
    if unknown or missing:
        raise ValueError(f"alpha must give one value per vector {names}; unknown {sorted(unknown)}, "
                         f"missing {sorted(missing)}")
    out = {}
    for n, a in given.items():
        # one number per vector: a per-row alpha would follow whatever batch the loader yields
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a):
            raise ValueError(f"alpha for {n!r} must be a finite number, got {a!r}")
        out[n] = float(a)
    return out


class PreventativeSteering:
    """Frozen-vector steering that can be switched on and off (see :func:`preventative_steering`).

    Created off; :meth:`on` patches the model if needed and installs the vectors, :meth:`off`
    removes them, :meth:`close` also unpatches the model if this object patched it.
    """

    def __init__(self, model: Union[nn.Module, PersonaHandle], vectors: Vectors, alpha,
                 layers: Layers = None, positions: str = "all", backend: Optional[str] = None):
        if positions not in POSITION_MODES:
            raise ValueError(f"positions must be one of {POSITION_MODES}, got {positions!r}")
        self._given_handle = model if isinstance(model, PersonaHandle) else None
        self.model = None if self._given_handle else model
        self.vectors = _named(vectors)
        self.alpha = _alphas(alpha, list(self.vectors))
        self.layers = layers
        self.positions = positions
        self.backend = backend
        self.handle: Optional[PersonaHandle] = self._given_handle
        self._owns_handle = False
        self._on = False

    @property
    def names(self) -> list:
        """Slot names in the handle: ``preventative/<trait>``."""
        return [PREFIX + n for n in self.vectors]

    @property
    def is_on(self) -> bool:
        return self._on

    def _get_handle(self) -> PersonaHandle:
        if self.handle is not None and self.handle.active:
            return self.handle
        if self._given_handle is not None:
            raise RuntimeError("the PersonaHandle given to preventative steering was unpatched")
        target = base_model(self.model)
        if is_patched(target):
            self.handle, self._owns_handle = getattr(find_decoder(target), ATTR), False
        else:
            self.handle, self._owns_handle = patch(target, backend=self.backend), True
        return self.handle

    def on(self) -> "PreventativeSteering":
        if self._on:
            return self
        handle = self._get_handle()
        taken = [n for n in self.names if n in handle.steering]
        if taken:
            raise RuntimeError(f"steering slots {taken} are already in use: is another preventative "
                               "steering block active on this model?")
        added = []
        try:
            for name, vec in self.vectors.items():
                if isinstance(vec, Tensor):
                    vec = vec.detach()  # frozen: the vectors are constants of the forward
                handle.steer(vec, self.alpha[name], layers=self.layers, positions=self.positions,
                             name=PREFIX + name)
                added.append(PREFIX + name)
        except BaseException:
            for n in added:
                handle.clear(n)
            raise
        self._on = True
        return self

    def off(self) -> "PreventativeSteering":
        if self._on:
            handle = self.handle
            if handle is not None and handle.active:
                for n in self.names:
                    if n in handle.steering:
                        handle.clear(n)
            self._on = False
        return self

    def close(self) -> None:
        """Remove the steering; unpatch the model if this object patched it."""
        self.off()
        if self._owns_handle and self.handle is not None:
            self.handle.unpatch()
        if self._given_handle is None:
            self.handle = None
        self._owns_handle = False

    def __enter__(self) -> "PreventativeSteering":
        try:
            return self.on()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()


def preventative_steering(model: Union[nn.Module, PersonaHandle], vectors: Vectors, alpha,
                          layers: Layers = None, positions: str = "all",
                          backend: Optional[str] = None) -> PreventativeSteering:
    """Steer ``model`` with frozen ``vectors`` inside a ``with`` block (for training).

    ``model``: a transformers model, a PEFT model, or a :class:`PersonaHandle` (reused as is).
    ``vectors``: a :class:`PersonaVector`, a ``[num_layers, hidden]`` tensor, a ``VectorSet``,
    a mapping name -> vector, or a list of PersonaVectors. ``alpha``: one number for all, or a
    mapping name -> number (positive to pre-empt a trait the data would teach).
    ``layers``: as in :meth:`PersonaHandle.steer` (None = each vector's recommended layer).
    ``positions``: ``"all"`` (the default and the paper's choice for training; a fresh forward
    is all "prompt", so ``"response"`` steers nothing unless ``handle.set_prompt_lengths`` says
    where answers start).

    On entry the model is patched if it is not already (an existing handle is reused); on exit
    the steering is removed and the model unpatched if it was patched here, so it gives the
    same logits as before the block.
    """
    return PreventativeSteering(model, vectors, alpha, layers=layers, positions=positions, backend=backend)


def _trainer_callback_base():
    try:
        from transformers import TrainerCallback
    except ImportError as e:  # pragma: no cover - transformers is a dependency
        raise ImportError("PreventativeSteeringCallback needs transformers") from e
    return TrainerCallback


class PreventativeSteeringCallback(_trainer_callback_base()):
    """``transformers.Trainer`` callback: preventative steering during the training steps.

    Steering is on from ``on_train_begin`` to ``on_train_end``. By default it is **off during
    evaluation, logging and checkpointing inside training** (switched off at each
    ``on_step_end``, on again at the next ``on_step_begin``; Trainer evaluates only after
    ``on_step_end`` or ``on_epoch_end``): the paper removes the steering at inference, so eval
    loss measures the model that will be deployed. ``steer_evaluation=True`` keeps it on
    throughout training, evaluation included.

    If training stops with an exception, ``on_train_end`` is not called: call :meth:`close`
    (the model is then as before training began, apart from its trained weights).
    """

    def __init__(self, vectors: Vectors, alpha, layers: Layers = None, positions: str = "all",
                 steer_evaluation: bool = False, backend: Optional[str] = None):
        self._args = dict(vectors=vectors, alpha=alpha, layers=layers, positions=positions, backend=backend)
        _alphas(alpha, list(_named(vectors)))  # fail at construction, not at train begin
        if positions not in POSITION_MODES:
            raise ValueError(f"positions must be one of {POSITION_MODES}, got {positions!r}")
        self.steer_evaluation = bool(steer_evaluation)
        self.steering: Optional[PreventativeSteering] = None

    @property
    def is_on(self) -> bool:
        return self.steering is not None and self.steering.is_on

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise RuntimeError("PreventativeSteeringCallback: the Trainer passed no model")
        self.close()
        self.steering = PreventativeSteering(model, **self._args)
        try:
            self.steering.on()
        except BaseException:
            self.close()   # Trainer stops here without on_train_end: leave the model unpatched
            raise

    def on_step_begin(self, args, state, control, **kwargs):
        if self.steering is not None:
            self.steering.on()

    def on_step_end(self, args, state, control, **kwargs):
        if self.steering is not None and not self.steer_evaluation:
            self.steering.off()

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def close(self) -> None:
        if self.steering is not None:
            self.steering.close()
            self.steering = None
