"""float32 ``exp`` in kernels as arithmetic the vectorizer keeps in vector registers.

LLVM lowers TVM's ``exp`` to a call of the C library's ``expf`` per element, also inside a vectorized
loop, where each lane is moved out, called and moved back: a softmax over 16 values cost ~38
instructions per element on arm-a53 (the tiny transformer's two attention softmaxes: 78.8k of its 259k
instructions as a C library). `vectorizable_exp` replaces every float32 ``exp`` call of a PrimFunc by the
Cephes ``expf`` algorithm written in TIR (as XNNPACK, Sleef and PyTorch's own vectorized ``exp`` do):

    n = ⌊x·log₂e + ½⌋,  r = (x − n·C₁) − n·C₂       (Cody–Waite: C₁ + C₂ = ln 2, C₁ exact in 9 bits)
    eʳ ≈ 1 + r + r²·P(r)                            (Cephes' degree-5 P, |r| ≤ ½ ln 2)
    eˣ = eʳ · 2^⌊n/2⌋ · 2^(n−⌊n/2⌋)                 (two normal scale factors: exact down to denormals)

with x < −103.98 → 0 and x > 88.73 → +inf (where float32 eˣ rounds to them) and NaN kept. Numerics
contract: within 2 ULP of eˣ (float64, rounded); 1 ULP the largest measured over 16.8M sampled float32
inputs, tests/test_vector_exp.py checks 1M on the compiled kernel (glibc's ``expf`` and PyTorch's
vectorized CPU ``exp`` are within 1 ULP). ``sigmoid`` and ``tanh``, which TVM lowers through ``exp``
after this point, are written here with TVM's formulas over `exp_f32` (``1 / (1 + e⁻ˣ)``; tanh from
``e^±2x``): absolute error at most 2⁻²³, as with ``expf``.

Other dtypes are left to LLVM, and so is every call on targets without IEEE float32 vectors
(`float_vectors`), where the arithmetic stays scalar and the C library's ``expf`` is as short or shorter
(the tiny transformer fp32: cortex-m4 1,275,241 instructions against 1,302,829 with the arithmetic,
armv7 574,524 against 576,162; cortex-m55 with Helium 456,268 → 401,410).
"""
from __future__ import annotations

import tvm
import tvm_ffi
from tvm import tirx

from graphopt.targets.lowering.prim_funcs import map_prim_funcs
from graphopt.targets.spec import Feature, TargetSpec

LOG2E = 1.44269504088896341
C1, C2 = 0.693359375, -2.12194440e-4  # ln 2 = C1 + C2; n·C1 is exact for |n| < 2^15
P = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
LOW, HIGH = -103.972084, 88.7228394  # float32 eˣ is 0 below and +inf above
_EXP, _SIGMOID, _TANH = (tvm.ir.Op.get(f"tirx.{name}") for name in ("exp", "sigmoid", "tanh"))


def _f32(v: float):
    return tirx.const(v, "float32")


def exp_f32(x):
    """The TIR expression computing float32 eˣ of the scalar float32 expression `x` (module docstring)."""
    clamped = tirx.Select(x < _f32(LOW), _f32(LOW), tirx.Select(x > _f32(HIGH), _f32(HIGH), x))
    n = tirx.floor(clamped * _f32(LOG2E) + _f32(0.5))
    r = (clamped - n * _f32(C1)) - n * _f32(C2)
    poly = _f32(P[0])
    for c in P[1:]:
        poly = poly * r + _f32(c)
    er = poly * (r * r) + r + _f32(1.0)
    ni = tirx.Cast("int32", n)
    half = tirx.shift_right(ni, tirx.const(1, "int32"))  # ⌊n/2⌋ (arithmetic shift)

    def power_of_two(k):
        return tirx.reinterpret("float32", tirx.shift_left(k + tirx.const(127, "int32"), tirx.const(23, "int32")))

    value = er * power_of_two(half) * power_of_two(ni - half)
    return tirx.Select(x < _f32(LOW), _f32(0.0), tirx.Select(x > _f32(HIGH), _f32(float("inf")), value))


def _rewrite(call):
    if str(call.ty) != "float32" or not any(call.op.same_as(op) for op in (_EXP, _SIGMOID, _TANH)):
        return call
    x, one = call.args[0], _f32(1.0)
    if call.op.same_as(_EXP):
        return exp_f32(x)
    if call.op.same_as(_SIGMOID):
        return one / (one + exp_f32(-x))
    down, up = exp_f32(_f32(-2.0) * x), exp_f32(_f32(2.0) * x)  # tanh
    return tirx.Select(x >= _f32(0.0), (one - down) / (one + down), (up - one) / (up + one))


def float_vectors(spec: TargetSpec) -> bool:
    """Whether LLVM vectorizes float32 arithmetic for `spec`: vectors of two lanes or more, except 32-bit
    ARM NEON (it flushes denormals, so IEEE float code stays on the scalar VFP unit)."""
    return spec.vector_bits >= 64 and not (spec.has(Feature.NEON) and not spec.has(Feature.A64))


def vectorizable_exp(mod: tvm.IRModule, spec: TargetSpec) -> tuple[tvm.IRModule, int]:
    """A copy of `mod` with every scalar float32 ``exp``, ``sigmoid`` and ``tanh`` call in its PrimFuncs written
    over `exp_f32` where `spec` has IEEE float32 vectors (`float_vectors`), and how many PrimFuncs that changed."""
    if not float_vectors(spec):
        return mod, 0
    return map_prim_funcs(mod, lambda func: tvm_ffi.structural_map(func, (tvm.ir.Call, _rewrite)))
