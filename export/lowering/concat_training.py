"""ConcatTraining -> Concat (+ its optional second output, each input's length along the axis, when it is read).

ConcatTraining(inputs..., axis) = (Concat(inputs, axis), per_input_length int64 [n]); ORT's gradient of Concat
splits the output gradient by per_input_length (SplitTraining).
"""

from __future__ import annotations

from ._rule import MS, Rule, attr


def check(node, ctx) -> str | None:
    if attr(node, "axis") is None:
        return "it has no axis attribute"
    if any(not i for i in node.input):
        return "it has an empty input name"
    return None


def length_along(b, x: str, axis: int) -> str:
    """x.shape[axis] as int64 [1]."""
    if b.ctx.opset >= 15:
        bounds = {"start": axis} if axis == -1 else {"start": axis, "end": axis + 1}
        return b.op("Shape", [x], **bounds)
    return b.op("Gather", [b.op("Shape", [x]), b.i64([axis])], axis=0)


def replace(node, b) -> None:
    axis = attr(node, "axis")
    b.op("Concat", list(node.input), [node.output[0]], axis=axis)
    if len(node.output) > 1 and b.ctx.is_used(node.output[1]):
        lengths = [length_along(b, x, axis) for x in node.input]
        b.op("Concat", lengths, [node.output[1]], axis=0)


CONCAT_TRAINING = Rule("ConcatTraining", MS, check, replace)
