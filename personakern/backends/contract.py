"""The fused ops' arguments, written once.

Every place that needs an op's parameter list reads it from :data:`OPS`: the ``torch.library``
schema, the fake kernels and the autograd save/restore (:mod:`personakern.ops.library`), the
Python signatures of the compiled backends (:mod:`personakern.backends.cpu`, ``triton``,
``cuda``), and the check that the native reference and the C++ table of
``csrc/cpu/persona_ops.cpp`` take the same arguments in the same order (``tests/test_contract.py``).
Adding an argument means adding it here and to each kernel.

The steering arguments travel as one group (:data:`STEERING`): the backends pass them through
to their kernels as a tuple in this order, so a new one reaches every kernel without any
backend spelling it out.

Functions with the real signatures are generated (:func:`define`), as ``dataclasses`` and
``namedtuple`` do, rather than written as ``*args`` wrappers: decode calls these ~90 times per
token, and a generated function costs no more per call than the hand-written one did.
"""
from __future__ import annotations

import __future__

import inspect
from collections import namedtuple
from typing import NamedTuple, Optional

# kinds (schema spelling)
TENSOR, OPT_TENSOR, FLOAT, BOOL = "Tensor", "Tensor?", "float", "bool"
# roles: GRAD tensors get gradients (and whether they require one picks the fast path);
# FROZEN tensors (persona vectors, coefficients, bounds) never do; scalars are plain inputs.
GRAD, FROZEN, SCALAR = "differentiable", "frozen", "input"
# layouts of the steering tensors: [K, D] vectors, or [N, K] values per row
VECTORS, PER_ROW = "vectors", "per_row"

REQUIRED = inspect.Parameter.empty


class Arg(NamedTuple):
    name: str
    kind: str
    role: str
    default: object = REQUIRED
    layout: Optional[str] = None


class Op(NamedTuple):
    args: tuple
    # each output is shaped like the named argument; "readings" is [N, M] float32, M = readout rows
    outputs: tuple
    # the public functions return None for the readings when no readout is given
    readings_of: Optional[str] = None


def _opt(name: str, layout: str) -> Arg:
    return Arg(name, OPT_TENSOR, FROZEN, None, layout)


STEERING = (
    _opt("steer_vecs", VECTORS), _opt("coef", PER_ROW),
    _opt("clamp_vecs", VECTORS), _opt("clamp_lo", PER_ROW), _opt("clamp_hi", PER_ROW),
    _opt("readout", VECTORS),
    _opt("gate_vecs", VECTORS), _opt("gate_thr", PER_ROW),
)
Steering = namedtuple("Steering", [a.name for a in STEERING])

_EPS = Arg("eps", FLOAT, SCALAR)
_GEMMA = Arg("gemma", BOOL, SCALAR, False)
_RESIDUAL_X_WEIGHT = (Arg("residual", TENSOR, GRAD), Arg("x", TENSOR, GRAD), Arg("weight", TENSOR, GRAD))

OPS = {
    "rms_norm": Op((Arg("x", TENSOR, GRAD), Arg("weight", TENSOR, GRAD), _EPS, _GEMMA), ("x",)),
    "steer_project": Op((Arg("hidden", TENSOR, GRAD), Arg("delta", OPT_TENSOR, GRAD, None)) + STEERING,
                        ("hidden", "readings"), "readout"),
    "add_rms_norm": Op(_RESIDUAL_X_WEIGHT + (_EPS, _GEMMA), ("residual", "residual")),
    "add_rms_norm_steer_project": Op(_RESIDUAL_X_WEIGHT + (_EPS, _GEMMA) + STEERING,
                                     ("residual", "residual", "readings"), "readout"),
}


def names(op: str) -> list[str]:
    return [a.name for a in OPS[op].args]


def required(op: str) -> int:
    """How many leading arguments have no default."""
    return sum(a.default is REQUIRED for a in OPS[op].args)


def schema(op: str) -> str:
    """The ``torch.library`` schema, e.g. ``(Tensor x, ..., bool gemma=False) -> Tensor``."""
    params = []
    for a in OPS[op].args:
        default = "" if a.default is REQUIRED else f"={a.default}"
        params.append(f"{a.kind} {a.name}{default}")
    outs = ["Tensor"] * len(OPS[op].outputs)
    ret = outs[0] if len(outs) == 1 else f"({', '.join(outs)})"
    return f"({', '.join(params)}) -> {ret}"


_ANNOTATION = {TENSOR: "Tensor", OPT_TENSOR: "Optional[Tensor]", FLOAT: "float", BOOL: "bool"}


def signature(op: str) -> inspect.Signature:
    """The Python signature every implementation of ``op`` has."""
    return inspect.signature(define(op, "pass", {}))


def define(op: str, body: str, namespace: dict, name: Optional[str] = None, doc: Optional[str] = None):
    """A function with ``op``'s signature whose body is ``body``.

    ``body`` is Python source (one or more lines) formatted with ``{args}`` (all arguments in
    order), ``{grad}`` (the differentiable ones), ``{steering}`` (the steering group) and
    ``{readout}`` (the argument whose absence makes the readings None); it runs with
    ``namespace`` as its globals.
    """
    spec = OPS[op]
    params = ", ".join(f"{a.name}: {_ANNOTATION[a.kind]}" + ("" if a.default is REQUIRED else f" = {a.default!r}")
                       for a in spec.args)
    fields = {"args": ", ".join(names(op)),
              "grad": ", ".join(a.name for a in spec.args if a.role == GRAD),
              "steering": ", ".join(a.name for a in STEERING),
              "readout": spec.readings_of}
    lines = body.format(**fields).strip("\n").splitlines()
    outs = ["Optional[Tensor]" if o == "readings" else "Tensor" for o in spec.outputs]
    ret = outs[0] if len(outs) == 1 else f"tuple[{', '.join(outs)}]"
    src = f"def {name or op}({params}) -> {ret}:\n" + "".join(f"    {line}\n" for line in lines)
    scope: dict = {}
    # annotations stay strings, as in the modules written with ``from __future__ import annotations``
    code = compile(src, f"<personakern contract: {name or op}>", "exec", flags=__future__.annotations.compiler_flag,
                   dont_inherit=True)
    exec(code, namespace, scope)
    fn = scope[name or op]
    fn.__doc__ = doc
    if "__name__" in namespace:
        fn.__module__ = namespace["__name__"]
    return fn


def has_steering(op: str) -> bool:
    return STEERING[0] in OPS[op].args


def define_backend(namespace: dict) -> None:
    """The four public ops of a backend module, each calling the module's ``_<op>`` with the
    leading arguments and, for the steering ops, the steering group as one tuple."""
    for op, spec in OPS.items():
        call = [a.name for a in spec.args if a not in STEERING]
        if has_steering(op):
            call.append("({steering},)")
        namespace[op] = define(op, f"return _{op}({', '.join(call)})", namespace,
                               doc=f"See :func:`personakern.backends.native.{op}`.")
