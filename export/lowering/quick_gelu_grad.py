"""QuickGeluGrad -> dX = dY·s·(1 + αx(1 − s)), s = Sigmoid(αx): ORT's kernel, in its order of operations.

The chain is ordered so dY dies before the second factor is built: at most four tensors of x's size at once
(the kernel holds three: dY, x, dX). α reaches x as a scalar gated on dY, so no part of the chain can run with the
forward and outlive it (ORT's priority order would keep Sigmoid(αx) from the forward to the backward otherwise).
"""

from __future__ import annotations

from ._rule import MS, Rule, attr, requires_inputs

DEFAULT_ALPHA = 1.702  # QuickGelu's and QuickGeluGrad's default


def replace(node, b) -> None:
    dy, x = node.input[0], node.input[1]
    alpha = float(attr(node, "alpha", DEFAULT_ALPHA))
    ax = b.op("Mul", [x, b.f32_after(alpha, dy)])           # αx, but only once dY exists (Builder.f32_after)
    s = b.op("Sigmoid", [ax])
    w = b.op("Mul", [dy, s])                                # dY·s
    t = b.op("Sub", [b.f32(1.0), s])                        # 1 − s
    v = b.op("Add", [b.f32(1.0), b.op("Mul", [ax, t])])     # 1 + αx(1 − s)
    b.op("Mul", [w, v], [node.output[0]])


QUICK_GELU_GRAD = Rule("QuickGeluGrad", MS, requires_inputs("dY", "X"), replace)
