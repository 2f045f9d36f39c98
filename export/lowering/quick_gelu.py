"""QuickGelu (strict only) -> x·Sigmoid(αx). Plain onnxruntime ships it (com.microsoft); strict=True expands it."""

from __future__ import annotations

from ._rule import MS, Rule, attr
from .quick_gelu_grad import DEFAULT_ALPHA


def check(node, ctx) -> str | None:
    return None if node.input and node.input[0] else "it has no input"


def replace(node, b) -> None:
    x = node.input[0]
    alpha = float(attr(node, "alpha", DEFAULT_ALPHA))
    ax = x if alpha == 1.0 else b.op("Mul", [x, b.f32(alpha)])
    b.op("Mul", [x, b.op("Sigmoid", [ax])], [node.output[0]])


QUICK_GELU = Rule("QuickGelu", MS, check, replace, strict_only=True)
