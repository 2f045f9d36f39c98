"""SliceGrad -> Pad of dY with zeros back to the sliced tensor's shape (unit steps only).

SliceGrad(dY, shape, starts, ends, [axes], [steps]) is zeros(shape) with dY written at the slice. With steps of 1
that is dY padded, per sliced axis a, by  begin = clamp(start, 0, dim)  (start < 0 counts from the end, as Slice
does) and  end = dim - begin - dY.shape[a]  (so `ends`, whatever its clamping, is implied by dY's length). Other
steps would scatter dY with gaps: not lowered; the node is named in the error.
"""

from __future__ import annotations

import numpy as np

from ._rule import MS, Rule, has_input


def check(node, ctx) -> str | None:
    if len(node.input) < 4 or not all(node.input[:4]):
        return "it lacks one of its inputs dY, shape, starts, ends"
    if has_input(node, 5):
        steps = ctx.constant(node.input[5])
        if steps is None:
            return f"its steps ({node.input[5]}) are not a constant; only steps of 1 can be lowered"
        if np.any(steps != 1):
            return f"its steps are {steps.tolist()}; only steps of 1 can be lowered (Pad)"
    return None


def replace(node, b) -> None:
    dy, shape, starts = node.input[0], node.input[1], node.input[2]
    shape = b.int64(shape)
    starts = b.int64(starts)
    rank = b.op("Size", [shape])  # scalar
    if has_input(node, 4):
        axes = b.int64(node.input[4])
    else:
        axes = b.op("Range", [b.i64(0), b.op("Size", [starts]), b.i64(1)])
    axes = b.op("Mod", [b.op("Add", [axes, rank]), rank])  # negative axes count from the back
    dims = b.op("Gather", [shape, axes], axis=0)
    zero = b.i64(0)
    begin = b.op("Where", [b.op("Less", [starts, zero]), b.op("Add", [starts, dims]), starts])
    begin = b.op("Min", [b.op("Max", [begin, zero]), dims])
    length = b.op("Gather", [b.op("Shape", [dy]), axes], axis=0)
    end = b.op("Sub", [b.op("Sub", [dims, begin]), length])
    if b.ctx.opset >= 18:  # Pad takes the axes the pads apply to
        pads = b.op("Concat", [begin, end], axis=0)
        b.op("Pad", [dy, pads, "", axes], [node.output[0]])
        return
    # pads for every axis: zeros [2·rank] with begin at axes and end at rank + axes
    zeros = b.op("ConstantOfShape", [b.op("Mul", [b.op("Shape", [shape]), b.i64([2])])],
                 value=_int64_zero())
    where = b.op("Concat", [axes, b.op("Add", [axes, rank])], axis=0)
    pads = b.op("ScatterElements", [zeros, where, b.op("Concat", [begin, end], axis=0)], axis=0)
    b.op("Pad", [dy, pads], [node.output[0]])


def _int64_zero():
    from onnx import TensorProto, helper

    return helper.make_tensor("zero", TensorProto.INT64, [1], [0])


SLICE_GRAD = Rule("SliceGrad", MS, check, replace)
