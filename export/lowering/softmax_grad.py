"""SoftmaxGrad_13 -> dX = Y·(dY − ReduceSum(dY·Y, axis, keepdims)), Softmax-13's single axis.

ORT's kernel: per row along `axis`, dot = Σ Y·dY, dX = (dY − dot)·Y. Peak as the kernel's: dY, Y and one temporary
of their size (dY·Y dies at the ReduceSum; dY − dot can take its place).
"""

from __future__ import annotations

from ._rule import MS, Rule, attr, requires_inputs


def replace(node, b) -> None:
    dy, y = node.input[0], node.input[1]
    axis = attr(node, "axis", -1)
    dot = b.reduce("ReduceSum", b.op("Mul", [dy, y]), [axis], keepdims=1)
    b.op("Mul", [b.op("Sub", [dy, dot]), y], [node.output[0]])


SOFTMAX_GRAD = Rule("SoftmaxGrad_13", MS, requires_inputs("dY", "Y"), replace)
