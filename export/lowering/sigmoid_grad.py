"""SigmoidGrad -> dX = dY·Y·(1 − Y), Y = Sigmoid(X) saved from the forward: ORT's kernel, in its order of operations.

ORT's gradient of Sigmoid; lars meets it in Gemma's MLP, whose tanh GELU is exported as x·Sigmoid(2u)
(architectures.py says why). The 1 reaches Y as a scalar gated on dY, so 1 − Y cannot be computed in the forward
and held to the backward (ORT's priority order would schedule it as early as Y exists otherwise).
"""

from __future__ import annotations

from ._rule import MS, Rule, requires_inputs


def replace(node, b) -> None:
    dy, y = node.input[0], node.input[1]
    w = b.op("Mul", [dy, y])                          # dY·Y
    t = b.op("Sub", [b.f32_after(1.0, dy), y])        # 1 − Y, only once dY exists
    b.op("Mul", [w, t], [node.output[0]])


SIGMOID_GRAD = Rule("SigmoidGrad", MS, requires_inputs("dY", "Y"), replace)
