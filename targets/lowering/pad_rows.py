"""Constant height/width pads of int8 NHWC tensors as row copies.

TVM legalizes ``relax.nn.pad`` to one select per output element (`Injective`: a border test and a
vector select per 16 bytes): arm-a53's mobilenet_blocks spends 7.5k instructions on each 16×16×64 pad its
depthwise convs read (`int8.legalize_grouped_conv2d` takes its input padded). Each image row of the output is
either all pad value, or the pad value left and right of one contiguous W·C-byte copy of an input row: `pad_nhwc`
writes it so, 16 bytes per load and store. Refuses (`legalizer` falls back to TVM's) other dtypes, ranks,
modes, and pads of the batch or channel axis.
"""
from __future__ import annotations

import tvm
from tvm import relax
from tvm.script import tirx as T

from graphopt.targets.lowering.prim_funcs import span, splat

PAD_ATTR = "graphopt.pad_rows"  # function attribute of `pad_nhwc`'s PrimFuncs
VECTOR = 16  # bytes per load and store


def pad_nhwc(shape: tuple[int, int, int, int], pad: tuple[int, int, int, int], value: int, dtype: str = "int8"):
    """A PrimFunc ``pad_nhwc(x, out)``: ``x`` NHWC `shape`, ``out`` it padded by `pad` = (top, bottom, left,
    right) rows and columns of `value`. Scheduled here (parallel over output rows) and opaque, so FuseOps
    leaves it whole."""
    n, h, w, c = shape
    pt, pb, pl, pr = pad
    rows, row = pt + h + pb, (pl + w + pr) * c

    def fill(width: int):
        return splat(value, width, dtype)

    def runs(width: int) -> tuple[int, int]:  # whole vectors, then the rest
        return width // VECTOR, width % VECTOR

    (full, rest), (left, left_rest), (inner, inner_rest), (right, right_rest) = (
        runs(row), runs(pl * c), runs(w * c), runs(pr * c))

    @T.prim_func(private=True, s_tir=True)
    def pad_rows(x: T.Buffer((n, h, w, c), dtype),  # type: ignore[valid-type]  # TVMScript
                 out: T.Buffer((n, rows, pl + w + pr, c), dtype)):  # type: ignore[valid-type]  # TVMScript
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8, PAD_ATTR: True})
        xf = T.decl_buffer((n * h * w * c,), dtype, data=x.data)
        of = T.decl_buffer((n * rows * row,), dtype, data=out.data)
        with T.sblock("root"):
            for by in T.parallel(n * rows):
                if by % rows < pt or by % rows >= pt + h:
                    for i in T.serial(full):
                        of[span(by * row + i * VECTOR, VECTOR)] = fill(VECTOR)
                    if rest > 0:
                        of[span(by * row + full * VECTOR, rest)] = fill(rest)
                else:
                    for i in T.serial(left):
                        of[span(by * row + i * VECTOR, VECTOR)] = fill(VECTOR)
                    if left_rest > 0:
                        of[span(by * row + left * VECTOR, left_rest)] = fill(left_rest)
                    for i in T.serial(inner):
                        of[span(by * row + pl * c + i * VECTOR, VECTOR)] = xf[
                            span(((by // rows) * h + by % rows - pt) * w * c + i * VECTOR, VECTOR)]
                    if inner_rest > 0:
                        of[span(by * row + pl * c + inner * VECTOR, inner_rest)] = xf[
                            span(((by // rows) * h + by % rows - pt) * w * c + inner * VECTOR, inner_rest)]
                    for i in T.serial(right):
                        of[span(by * row + (pl + w) * c + i * VECTOR, VECTOR)] = fill(VECTOR)
                    if right_rest > 0:
                        of[span(by * row + (pl + w) * c + right * VECTOR, right_rest)] = fill(right_rest)

    return pad_rows


def legalizer():
    """LegalizeOps override for ``relax.nn.pad``: `pad_nhwc` for constant pads of the height and width of a
    static int8 4-D tensor, TVM's own legalization otherwise."""
    default = tvm.ir.Op.get("relax.nn.pad").get_attr("FLegalize")

    def legalize(bb: relax.BlockBuilder, call: relax.Call):
        x = call.args[0]
        shape = x.ty.shape
        widths = [int(v) for v in call.attrs.pad_width]
        value = float(call.attrs.pad_value)
        if str(call.attrs.pad_mode) != "constant" or str(x.ty.dtype) != "int8" or shape is None \
                or len(shape) != 4 or any(not isinstance(d, tvm.tirx.IntImm) for d in shape) \
                or widths[:2] != [0, 0] or widths[6:] != [0, 0] or value != int(value) or not -128 <= value <= 127:
            return default(bb, call)
        n, h, w, c = (int(d) for d in shape)
        gv = bb.add_func(pad_nhwc((n, h, w, c), (widths[2], widths[3], widths[4], widths[5]), int(value)),
                         "pad_rows")
        out = (n, h + widths[2] + widths[3], w + widths[4] + widths[5], c)
        return relax.call_tir(gv, [x], relax.TensorType(out, "int8"))

    return legalize
