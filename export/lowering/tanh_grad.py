"""TanhGrad -> dX = dY·(1 − Y²), Y = Tanh(X) saved from the forward: ORT's kernel, in its order of operations.

ORT's gradient of Tanh (logit or attention soft-capping, a tanh activation). The 1 reaches Y² as a scalar gated on
dY, so 1 − Y² cannot be computed in the forward and held to the backward.
"""

from __future__ import annotations

from ._rule import MS, Rule, requires_inputs


def replace(node, b) -> None:
    dy, y = node.input[0], node.input[1]
    t = b.op("Sub", [b.f32_after(1.0, dy), b.op("Mul", [y, y])])   # 1 − Y², only once dY exists
    b.op("Mul", [dy, t], [node.output[0]])


TANH_GRAD = Rule("TanhGrad", MS, requires_inputs("dY", "Y"), replace)
