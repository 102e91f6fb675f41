"""Kernels too small to share between cores run without a parallel region.

Every scheduled kernel parallelizes its outer loop; TVM turns that loop into a lambda launched on the
runtime's thread pool. The launch and the closing barrier cost the same whatever the loop holds: ~800
instructions per call on arm-a55 with one thread, microseconds of waking and joining workers with
several — more than a kernel of a few thousand instructions gains from the other cores. Transformers
are made of such kernels (the zoo's tiny transformer int8: 44 of its 48, per-head reshapes, transposes
and 128-value quantizes; on arm-a55 331.7k → 302.6k instructions per inference, docs/benchmarks.md).
ONNX Runtime decides the same way (its ``TryParallelFor`` runs small work inline, by a cost model).

`serial_small_kernels` makes every parallel loop of a PrimFunc serial when the PrimFunc's
`estimated_work` (loop iterations reaching a store, a vector store counted once) is below
`SERIAL_WORK`. Kernels at or above it are left as scheduled. Refuses nothing; a loop of unknown extent
counts as one iteration (no kernel here has one: shapes are static).
"""
from __future__ import annotations

import tvm
import tvm_ffi
from tvm import tirx

from graphopt.targets.lowering.prim_funcs import map_prim_funcs

# Below this many estimated iterations a kernel runs serially: on arm-a55 ~4–7k instructions (a few µs),
# e.g. depthwise_concat's depthwise re-layouts of 8×8 feature maps, a concat, the pooled head
SERIAL_WORK = 4096

# statement fields that hold further statements (``init``: a reduction block's initialization)
_NESTED = ("body", "then_case", "else_case", "block", "init")


def estimated_work(func: tirx.PrimFunc) -> int:
    """Iterations of `func`'s loop nests that reach a buffer store: the product of the enclosing loops'
    extents (a vectorized loop counts once, it is one vector store) summed over the stores; both branches
    of a condition count."""
    total = 0

    def visit(stmt, iterations: int) -> None:
        nonlocal total
        if isinstance(stmt, tirx.For):
            extent = stmt.extent.value if isinstance(stmt.extent, tirx.IntImm) else 1
            visit(stmt.body, iterations * (1 if stmt.kind == tirx.ForKind.VECTORIZED else extent))
        elif isinstance(stmt, tirx.BufferStore):
            total += iterations
        elif isinstance(stmt, tirx.SeqStmt):
            for s in stmt.seq:
                visit(s, iterations)
        else:
            for name in _NESTED:
                nested = getattr(stmt, name, None)
                if isinstance(nested, tirx.Stmt):
                    visit(nested, iterations)

    visit(func.body, 1)
    return total


def _serial(loop: tirx.For) -> tirx.For:
    if loop.kind != tirx.ForKind.PARALLEL:
        return loop
    return tirx.For(loop.loop_var, loop.min, loop.extent, tirx.ForKind.SERIAL, loop.body, loop.thread_binding,
                    loop.annotations, loop.step)


def serial_small_kernels(mod: tvm.IRModule) -> tuple[tvm.IRModule, int]:
    """A copy of `mod` with the PrimFuncs of `estimated_work` below `SERIAL_WORK` made serial, and how
    many PrimFuncs that changed."""
    return map_prim_funcs(mod, lambda func: tvm_ffi.structural_map(func, (tirx.For, _serial))
                          if estimated_work(func) < SERIAL_WORK else func)
