"""The op contract (personakern/backends/contract.py) is what every implementation takes.

An argument added to the contract reaches the registered schema, the fake kernels, the autograd
wrapper and the backends' signatures by itself; these tests say which places would otherwise
drift: the hand-written native reference and the C++ extension's binding.
"""
import inspect

import pytest
import torch

from personakern import ops as dispatch
from personakern.backends import contract, cuda, native, triton
from personakern.ops import library

OPS = tuple(contract.OPS)


def _params(fn):
    return [(p.name, p.default, p.kind) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize("op", OPS)
def test_every_python_implementation_has_the_contract_signature(op):
    want = contract.signature(op)
    for module in (native, triton, cuda):
        assert inspect.signature(getattr(module, op)) == want, (module.NAME, op)


@pytest.mark.parametrize("op", OPS)
def test_cpu_extension_binds_the_contract(op):
    if not dispatch.backend_usable("cpu"):
        pytest.skip(dispatch.unavailable_reason("cpu"))
    from personakern.backends import cpu
    fn = getattr(cpu, op)
    assert type(fn).__name__ == "builtin_function_or_method"  # the C entry point, no Python frame
    assert _params(fn) == _params(native.__dict__[op]), op


def test_registered_schemas_come_from_the_contract():
    ns = library.register("contract_test", native)
    for op in OPS:
        schema = str(getattr(ns.ops, op)._opoverload._schema)
        assert schema == f"personakern::contract_test_{op}{contract.schema(op)}", op
        assert inspect.signature(getattr(ns, op)) == contract.signature(op)


def test_every_argument_is_described_once():
    for op, spec in contract.OPS.items():
        names = contract.names(op)
        assert len(set(names)) == len(names), op
        assert all(a.default is not contract.REQUIRED for a in spec.args[contract.required(op):]), op
        assert all(o == "readings" or o in names for o in spec.outputs), op
        for a in spec.args:
            assert a.kind in (contract.TENSOR, contract.OPT_TENSOR, contract.FLOAT, contract.BOOL)
            assert a.role == contract.SCALAR if a.kind in (contract.FLOAT, contract.BOOL) else a.role != contract.SCALAR


def test_an_argument_added_to_the_contract_reaches_the_generated_pieces(monkeypatch):
    # The generated parts pick up a new steering argument with no other edit.
    extra = contract.Arg("extra_vecs", contract.OPT_TENSOR, contract.FROZEN, None, contract.VECTORS)
    op = contract.OPS["steer_project"]
    monkeypatch.setitem(contract.OPS, "steer_project", op._replace(args=op.args + (extra,)))
    assert contract.schema("steer_project").endswith("Tensor? gate_thr=None, Tensor? extra_vecs=None) -> (Tensor, Tensor)")
    seen = {}
    fn = contract.define("steer_project", "seen['args'] = ({args},)", {"seen": seen})
    fn(torch.zeros(1, 2), extra_vecs="x")
    assert seen["args"][-1] == "x" and len(seen["args"]) == len(op.args) + 1


def test_kernels_take_the_steering_group_in_contract_order():
    # The CUDA binding and the Triton kernel take the group positionally; their own names for it
    # must follow the contract's order.
    import re
    from pathlib import Path
    root = Path(contract.__file__).resolve().parents[1]
    binding = (root / "csrc" / "cuda" / "binding.cpp").read_text()
    params = binding[binding.index("std::tuple<Tensor, Tensor, Tensor> rows("):].split(")", 1)[0]
    cuda_names = re.findall(r"(\w+)\s*(?:,|$)", params)
    steering = [a.name for a in contract.STEERING]
    assert cuda_names[-len(steering):] == steering
    triton_src = (root / "kernels" / "triton_ops.py").read_text()
    unpack = re.search(r"^\s*([\w, ]+) = steering$", triton_src, re.M).group(1)
    assert [n.strip() for n in unpack.split(",")] == steering


def test_cpu_extension_sends_arguments_it_does_not_read_to_native(monkeypatch):
    if not dispatch.backend_usable("cpu"):
        pytest.skip(dispatch.unavailable_reason("cpu"))
    from personakern.backends import cpu
    ext = cpu._load()
    extra = contract.Arg("extra_vecs", contract.OPT_TENSOR, contract.FROZEN, None, contract.VECTORS)
    spec = contract.OPS["steer_project"]
    seen = []

    def fake_native(*args, **kwargs):
        seen.append(kwargs)
        return "native"

    natives = [getattr(native, op) for op in cpu._OPS]
    try:
        monkeypatch.setitem(contract.OPS, "steer_project", spec._replace(args=spec.args + (extra,)))
        ext._set_fallbacks(*natives[:1], fake_native, *natives[2:], cpu._parameters())
        h = torch.randn(2, 8)
        assert ext.steer_project(h, extra_vecs=torch.ones(1, 8)) == "native"
        out, _ = ext.steer_project(h, extra_vecs=None)  # not given: the fast path serves it
        assert torch.equal(out, h) and len(seen) == 1
    finally:
        monkeypatch.undo()
        ext._set_fallbacks(*natives, cpu._parameters())
    assert _params(ext.steer_project) == _params(native.steer_project)
