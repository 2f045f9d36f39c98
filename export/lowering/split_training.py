"""SplitTraining -> Split, the split sizes taken from its second input (as Split reads them from opset 13 on)."""

from __future__ import annotations

from ._rule import MS, Rule, attr, has_input


def check(node, ctx) -> str | None:
    if not node.output:
        return "it has no outputs"
    return None


def replace(node, b) -> None:
    axis = attr(node, "axis", 0)
    outputs = list(node.output)
    if has_input(node, 1):
        b.op("Split", [node.input[0], node.input[1]], outputs, axis=axis)
    elif b.ctx.opset >= 18:  # equal parts
        b.op("Split", [node.input[0]], outputs, axis=axis, num_outputs=len(outputs))
    else:
        b.op("Split", [node.input[0]], outputs, axis=axis)


SPLIT_TRAINING = Rule("SplitTraining", MS, check, replace)
