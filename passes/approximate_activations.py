"""Declared approximations of transcendental activations, made only when the user allows them.

Numerics contract: float32 rational approximations (Eigen's `generic_fast_tanh_float` and
`generic_fast_erf_float` minimax coefficients) built only from clamp, add, mul and div:

    tanh(x)    ≈ x̂·P(x̂²)/Q(x̂²),  x̂ = clamp(x, ±7.9053111)      (saturates to exactly ±1 in float32)
    erf(x)     ≈ x̂·P(x̂²)/Q(x̂²),  x̂ = clamp(x, ±4)
    sigmoid(x) = 0.5·tanh(x/2) + 0.5
    silu(x)    = max(x, −20)·sigmoid(x)                  (|silu(x)| < 5e-8 below −20; worst error
                                                          2.3e-6 near x = −16, where tanh saturates)
    gelu(x)    = 0.5·max(x, −10)·(1 + erf(x/√2))         (|gelu(x)| < 1e-22 below −10)
    gelu_tanh  = 0.5·max(x, −10)·(1 + tanh(√(2/π)·(x + 0.044715·x³)))

Each rule declares a bound on err(x) = |approx(x) − f(x)| / max(1, |f(x)|) (absolute near zero,
relative for large outputs) over all finite float32 x, f evaluated in float64; the report states
the error *measured* on a dense grid plus extreme magnitudes (`measured_error`). Without
``approximate=True`` nothing is rewritten: each node is declined with the rewrite that would be made
and its error. In int8 graphs these activations are exact lookup tables (`graphopt.qlut`, made by
`FoldQDQ`), not approximations.
"""
from __future__ import annotations

import functools
import math

import torch

from graphopt.passes.graph import arg
from graphopt.passes.rewrite import LegalizePass, Rewrite, TensorEmitter, unfit

aten = torch.ops.aten

TANH_CLAMP = 7.90531110763549805
TANH_P = (4.89352455891786e-03, 6.37261928875436e-04, 1.48572235717979e-05, 5.12229709037114e-08,
          -8.60467152213735e-11, 2.00018790482477e-13, -2.76076847742355e-16)
TANH_Q = (4.89352518554385e-03, 2.26843463243900e-03, 1.18534705686654e-04, 1.19825839466702e-06)
ERF_CLAMP = 4.0
ERF_P = (-1.60960333262415e-02, -2.95459980854025e-03, -7.34990630326855e-04, -5.69250639462346e-05,
         -2.10102402082508e-06, 2.77068142495902e-08, -2.72614225801306e-10)
ERF_Q = (-1.42647390514189e-02, -7.37332916720468e-03, -1.68282697438203e-03, -2.13374055278905e-04,
         -1.45660718464996e-05)
OPS = ("clamp", "add", "mul", "div")


def _poly(e, x2, coeffs):
    """Horner: c0 + c1·x² + c2·x⁴ + ..."""
    p = e.call(aten.add.Tensor, e.call(aten.mul.Tensor, x2, coeffs[-1]), coeffs[-2])
    for c in reversed(coeffs[:-2]):
        p = e.call(aten.add.Tensor, e.call(aten.mul.Tensor, p, x2), c)
    return p


def _rational(e, x, bound, p, q):
    xc = e.call(aten.clamp.default, x, -bound, bound)
    x2 = e.call(aten.mul.Tensor, xc, xc)
    return e.call(aten.div.Tensor, e.call(aten.mul.Tensor, xc, _poly(e, x2, p)), _poly(e, x2, q))


def tanh(e, x):
    return _rational(e, x, TANH_CLAMP, TANH_P, TANH_Q)


def sigmoid(e, x):
    return e.call(aten.add.Tensor, e.call(aten.mul.Tensor, tanh(e, e.call(aten.mul.Tensor, x, 0.5)), 0.5), 0.5)


def silu(e, x):
    return e.call(aten.mul.Tensor, e.call(aten.clamp.default, x, -20.0), sigmoid(e, x))


def _half_x_times(e, x, s):
    """0.5·max(x, −10)·(1 + s)."""
    return e.call(aten.mul.Tensor, e.call(aten.mul.Tensor, e.call(aten.clamp.default, x, -10.0), 0.5),
                  e.call(aten.add.Tensor, s, 1.0))


def gelu_erf(e, x):
    return _half_x_times(e, x, _rational(e, e.call(aten.mul.Tensor, x, 1 / math.sqrt(2)), ERF_CLAMP, ERF_P, ERF_Q))


def gelu_tanh(e, x):
    inner = e.call(aten.add.Tensor, x, e.call(aten.mul.Tensor, e.call(aten.mul.Tensor, e.call(
        aten.mul.Tensor, x, x), x), 0.044715))
    return _half_x_times(e, x, tanh(e, e.call(aten.mul.Tensor, inner, math.sqrt(2 / math.pi))))


def _gelu_is(variant: str):
    def needed(node, gm, ops):
        return unfit(node, gm, ops) if arg(node, 1, "approximate", "none") == variant else None
    return needed


def _unary(fn):
    return lambda e, args, kwargs: fn(e, args[0])


REWRITES = (
    Rewrite((aten.tanh.default,), "tanh → rational minimax (clamp, mul, add, div)", OPS,
            "tanh(x) ≈ x·P(x²)/Q(x²) on clamp(x, ±7.905)", unfit, _unary(tanh), 1e-6, torch.tanh),
    Rewrite((aten.sigmoid.default,), "sigmoid → 0.5·tanh(x/2) + 0.5, rational tanh", OPS,
            "sigmoid(x) = 0.5·tanh(x/2) + 0.5", unfit, _unary(sigmoid), 1e-6, torch.sigmoid),
    Rewrite((aten.silu.default,), "silu → x·sigmoid(x), rational tanh", OPS,
            "silu(x) = x·(0.5·tanh(x/2) + 0.5)", unfit, _unary(silu), 3e-6, torch.nn.functional.silu),
    Rewrite((aten.gelu.default,), "gelu (erf) → 0.5·x·(1 + erf(x/√2)), rational erf", OPS,
            "gelu(x) = 0.5·x·(1 + erf(x/√2)), erf(x) ≈ x·P(x²)/Q(x²) on clamp(x, ±4)", _gelu_is("none"),
            _unary(gelu_erf), 2e-6, torch.nn.functional.gelu),
    Rewrite((aten.gelu.default,), "gelu (tanh) → rational tanh", OPS,
            "gelu_tanh(x) = 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))", _gelu_is("tanh"), _unary(gelu_tanh), 2e-6,
            lambda x: torch.nn.functional.gelu(x, approximate="tanh")),
)


def grid() -> torch.Tensor:
    """float32 test points: a 1e-4 grid on [−16, 16] and ± magnitudes from 1e-30 to 3e38."""
    mags = torch.logspace(-30, math.log10(3e38), 4001, dtype=torch.float64)
    return torch.cat([torch.linspace(-16, 16, 320001, dtype=torch.float64), mags, -mags,
                      torch.zeros(1, dtype=torch.float64)]).float()


def error(rewrite: Rewrite, x: torch.Tensor) -> float:
    """max |approx(x) − f(x)| / max(1, |f(x)|): the approximation in x's dtype, f in float64."""
    if rewrite.reference is None:
        raise ValueError(f"{rewrite.name} is exact: it has no reference to measure against")
    got = rewrite.build(TensorEmitter(), (x,), {}).double()
    want = rewrite.reference(x.double())
    return float(((got - want).abs() / want.abs().clamp_min(1.0)).max())


@functools.cache
def measured_error(rewrite: Rewrite) -> float:
    return error(rewrite, grid())


class ApproximateActivations(LegalizePass):
    """Rewrites activations the target lacks by the approximations above when ``allowed``."""

    name = "approximate-activations"
    exact = False
    REWRITES = REWRITES

    def __init__(self, allowed: bool = False):
        self.allowed = allowed

    def max_error(self, rewrite: Rewrite) -> float:
        return measured_error(rewrite)

    def decline(self, rewrite: Rewrite, node, reason: str) -> str | None:
        if self.allowed:
            return None
        return (f"would need approximate=True: {rewrite.name}, max error "
                f"{measured_error(rewrite):.1e} (declared ≤ {rewrite.declared_error:.0e})")

    def __repr__(self) -> str:
        return f"ApproximateActivations(allowed={self.allowed})"
