"""SimplifiedLayerNormalization (strict only) -> the RMS norm in ONNX ops, as ORT's kernel computes it:

    d = Sqrt(ReduceMean(x², normalised axes) + ε),  y = x / d · scale,  inv_std_var = 1 / d (only when read)

Plain onnxruntime ships this op (in the ONNX domain, as a contrib op); strict=True expands it for runtimes that
have only standard ONNX.
"""

from __future__ import annotations

from ._rule import Rule, attr
from .simplified_layer_norm_grad import norm_axes

DEFAULT_EPSILON = 1e-5


def check(node, ctx) -> str | None:
    if len(node.input) < 2 or not all(node.input[:2]):
        return "it lacks X or scale"
    if len(node.input) > 2 and node.input[2]:
        return "it has a bias input (not a simplified layer norm)"
    if norm_axes(node, ctx, node.input[0]) is None:
        return f"its axis {attr(node, 'axis')} is non-negative and the rank of {node.input[0]} is unknown"
    return None


def replace(node, b) -> None:
    x, scale = node.input[0], node.input[1]
    axes = norm_axes(node, b.ctx, x)
    epsilon = float(attr(node, "epsilon", DEFAULT_EPSILON))
    mean_square = b.reduce("ReduceMean", b.op("Pow", [x, b.f32(2.0)]), axes, keepdims=1)
    d = b.op("Sqrt", [b.op("Add", [mean_square, b.f32(epsilon)])])
    b.op("Mul", [b.op("Div", [x, d]), scale], [node.output[0]])
    if len(node.output) > 1 and node.output[1] and b.ctx.is_used(node.output[1]):
        b.op("Div", [b.f32(1.0), d], [node.output[1]])


SIMPLIFIED_LAYER_NORM = Rule("SimplifiedLayerNormalization", "", check, replace, strict_only=True)
