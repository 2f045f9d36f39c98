"""SimplifiedLayerNormalizationGrad -> ORT's kernel in ONNX ops (r = the forward's saved inverse RMS):

    x̂ = x·r,  B = dY·scale·r,  dX = B − x̂·mean(B·x̂)        (means over the normalised axes)
    dscale = Σ_rows dY·x̂                                    (only when read: a frozen norm's weight needs none)

dscale sums dY·x̂ viewed as [-1, scale's shape] over its first axis, so it needs no rank.
"""

from __future__ import annotations

from ._rule import MS, Rule, attr


def norm_axes(node, ctx, x: str) -> list[int] | None:
    """The axes normalised over: axis .. last (negative when axis is, so no rank is needed)."""
    axis = attr(node, "axis", -1)
    if axis < 0:
        return list(range(axis, 0))
    rank = ctx.rank(x)
    return None if rank is None else list(range(axis, rank))


def check(node, ctx) -> str | None:
    if len(node.input) < 4 or not all(node.input[:4]):
        return "it lacks one of its inputs dY, X, scale, inv_std_var"
    if norm_axes(node, ctx, node.input[1]) is None:
        return f"its axis {attr(node, 'axis')} is non-negative and the rank of {node.input[1]} is unknown"
    return None


def replace(node, b) -> None:
    dy, x, scale, inv_std = node.input[:4]
    axes = norm_axes(node, b.ctx, x)
    # Every product with x or r takes a dY-derived operand first: a node on forward tensors alone (x̂ = x·r) would
    # run with the forward and keep an [rows, hidden] tensor per norm until the backward (ORT's priority order).
    big_b = b.op("Mul", [b.op("Mul", [dy, scale]), inv_std])           # B = dY·scale·r
    mean_bx = b.reduce("ReduceMean", b.op("Mul", [big_b, x]), axes, keepdims=1)
    coeff = b.op("Mul", [mean_bx, inv_std])                            # mean(B·x̂) = r·mean(B·x)
    b.op("Sub", [big_b, b.op("Mul", [b.op("Mul", [x, coeff]), inv_std])], [node.output[0]])  # B − x̂·mean(B·x̂)
    if len(node.output) > 1 and b.ctx.is_used(node.output[1]):
        rows = b.op("Reshape", [b.op("Mul", [b.op("Mul", [dy, x]), inv_std]),   # dY·x̂
                                b.op("Concat", [b.i64([-1]), b.op("Shape", [scale])], axis=0)])
        b.reduce("ReduceSum", rows, [0], keepdims=0, output=[node.output[1]])


SIMPLIFIED_LAYER_NORM_GRAD = Rule("SimplifiedLayerNormalizationGrad", MS, check, replace)
