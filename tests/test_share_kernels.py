"""Kernel sharing (`graphopt.targets.share_kernels`): kernels that differ only in immediates inside
computed values become one kernel reading them per call, identical ones merge, anything else stays
apart; the shared module computes exactly what the original did (both built for the host and run
on the same inputs, every int8 saturation edge included)."""
from __future__ import annotations

import numpy as np
import pytest
import tvm
from graphopt.targets.share_kernels import share_kernels
from tvm import relax, tirx
from tvm.script import tirx as T


@T.prim_func(private=True, s_tir=True)
def _plus5(A: T.Buffer((64,), "int32"), B: T.Buffer((64,), "int8")):
    for i in range(64):
        with T.sblock("b"):
            v = T.axis.spatial(64, i)
            B[v] = T.Cast("int8", T.min(T.max(A[v] + 5, -128), 127))


@T.prim_func(private=True, s_tir=True)
def _minus3(A: T.Buffer((64,), "int32"), B: T.Buffer((64,), "int8")):  # x - c: TVM's form of a negative zero point
    for i in range(64):
        with T.sblock("b"):
            v = T.axis.spatial(64, i)
            B[v] = T.Cast("int8", T.min(T.max(A[v] - 3, -100), 127))


@T.prim_func(private=True, s_tir=True)
def _minus9(A: T.Buffer((64,), "int32"), B: T.Buffer((64,), "int8")):
    for i in range(64):
        with T.sblock("b"):
            v = T.axis.spatial(64, i)
            B[v] = T.Cast("int8", T.min(T.max(A[v] - 9, -128), 127))


@T.prim_func(private=True, s_tir=True)
def _halves(A: T.Buffer((64,), "int32"), B: T.Buffer((64,), "int8")):  # same values, another loop nest
    for i, j in T.grid(2, 32):
        with T.sblock("b"):
            v = T.axis.spatial(64, i * 32 + j)
            B[v] = T.Cast("int8", T.min(T.max(A[v] + 7, -128), 127))


@T.prim_func(private=True, s_tir=True)
def _plus_big(A: T.Buffer((64,), "int64"), B: T.Buffer((64,), "int8")):
    for i in range(64):
        with T.sblock("b"):
            v = T.axis.spatial(64, i)
            B[v] = T.Cast("int8", T.min(T.max(A[v] + T.int64(1 << 40), T.int64(-128)), T.int64(127)))


@T.prim_func(private=True, s_tir=True)
def _plus_small(A: T.Buffer((64,), "int64"), B: T.Buffer((64,), "int8")):
    for i in range(64):
        with T.sblock("b"):
            v = T.axis.spatial(64, i)
            B[v] = T.Cast("int8", T.min(T.max(A[v] + T.int64(1), T.int64(-128)), T.int64(127)))


def _module(funcs, dtype="int32"):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((64,), dtype))
    with bb.function("main", [x]):
        with bb.dataflow():
            outs = [bb.emit(relax.call_tir(bb.add_func(f, f"k{i}"), (x,), relax.TensorType((64,), "int8")))
                    for i, f in enumerate(funcs)]
            out = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(out)
    return bb.get()


def _run(mod, x: np.ndarray) -> list[np.ndarray]:
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    return [o.numpy() for o in vm["main"](tvm.runtime.tensor(x))]


def _kernels(mod) -> list[str]:
    return sorted(gv.name_hint for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc))


def test_layers_differing_in_immediates_share_one_kernel_and_compute_the_same():
    mod = _module([_plus5, _minus3, _minus9, _halves])
    shared, stats = share_kernels(mod)
    assert stats["kernels_before"] == 4 and stats["kernels_after"] == 2
    assert stats["shared"] == [{"kernel": "k0_shared", "layers": 3, "immediates": 2}] and not stats["declined"]
    assert _kernels(shared) == ["k0_shared", "k3"]  # the other loop nest keeps its own kernel
    x = np.arange(-400, 400, 12.5).astype(np.int32)[:64]
    want = _run(mod, x)
    assert [int(o.min()) for o in want] == [-128, -100, -128, -128] and int(want[0].max()) == 127
    for got, ref in zip(_run(shared, x), want):
        np.testing.assert_array_equal(got, ref)


def test_identical_kernels_merge_without_a_parameter():
    mod = _module([_plus5, _minus3])
    mod["k1"] = _plus5  # Relax's BlockBuilder merges equal kernels itself; a module built otherwise may not
    shared, stats = share_kernels(mod)
    assert stats["shared"] == [{"kernel": "k0", "layers": 2, "immediates": 0}]
    assert _kernels(shared) == ["k0"] and len(shared["k0"].params) == 2


@pytest.mark.parametrize("funcs", [[_plus_big, _plus_small]])
def test_immediates_beyond_int32_keep_their_kernels(funcs):
    mod = _module(funcs, "int64")
    shared, stats = share_kernels(mod)
    assert _kernels(shared) == ["k0", "k1"] and stats["kernels_after"] == 2
    assert stats["declined"] and "int64" in stats["declined"][0]["reason"]


@T.prim_func(private=True, s_tir=True)
def _qmul5(A: T.Buffer((64,), "int32"), B: T.Buffer((64,), "int32")):
    for i in range(64):
        with T.sblock("b"):
            v = T.axis.spatial(64, i)
            B[v] = T.q_multiply_shift(A[v], 1 << 30, 31, 5)


@T.prim_func(private=True, s_tir=True)
def _qmul6(A: T.Buffer((64,), "int32"), B: T.Buffer((64,), "int32")):
    for i in range(64):
        with T.sblock("b"):
            v = T.axis.spatial(64, i)
            B[v] = T.q_multiply_shift(A[v], 1 << 30, 31, 6)


def test_immediates_of_intrinsic_calls_stay_constants():
    """q_multiply_shift's shift must be a constant when it lowers: kernels differing there stay apart."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((64,), "int32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            outs = [bb.emit(relax.call_tir(bb.add_func(f, f"q{i}"), (x,), relax.TensorType((64,), "int32")))
                    for i, f in enumerate((_qmul5, _qmul6))]
            out = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(out)
    shared, stats = share_kernels(bb.get())
    assert _kernels(shared) == ["q0", "q1"] and not stats["shared"]
