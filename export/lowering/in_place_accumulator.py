"""InPlaceAccumulatorV2 -> nothing: each gradient becomes a graph output instead.

ORT adds gradients into a persistent `<param>_grad.accumulation.buffer` (reset on `lazy_reset_grad`) and outputs a
bool "updated" flag. The lowered step never accumulates across calls: lower_training_step makes `<param>_grad`
itself the graph output and drops the buffers, the flag and `lazy_reset_grad`; this rule only removes the node.
"""

from __future__ import annotations

from ._rule import MS, Rule


def check(node, ctx) -> str | None:
    read = [o for o in node.output if o and ctx.consumers.get(o)]
    if read:
        return f"its output {read[0]} is read by another node (the lowered step outputs the gradient itself)"
    if len(node.input) < 2 or not node.input[1]:
        return "it has no gradient input"
    return None


def replace(node, b) -> None:
    return None


IN_PLACE_ACCUMULATOR = Rule("InPlaceAccumulatorV2", MS, check, replace)
