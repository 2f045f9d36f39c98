"""FusedMatMul (strict only) -> MatMul of the (last-two-axes) transposed inputs, times alpha when it is not 1.

Plain onnxruntime ships FusedMatMul (com.microsoft) and re-fuses Transpose + MatMul into it; strict=True expands it
for runtimes that have only standard ONNX. The transposes need each transposed input's rank (declared or
inferred); transBatchA/transBatchB (batch-axis transposes) are not lowered.
"""

from __future__ import annotations

from ._rule import MS, Rule, attr


def check(node, ctx) -> str | None:
    if len(node.input) < 2 or not all(node.input[:2]):
        return "it lacks A or B"
    for flag in ("transBatchA", "transBatchB"):
        if attr(node, flag, 0):
            return f"{flag}=1 is not lowered"
    for flag, x in (("transA", node.input[0]), ("transB", node.input[1])):
        if attr(node, flag, 0):
            rank = ctx.rank(x)
            if rank is None:
                return f"{flag}=1 and the rank of {x} is unknown"
            if rank < 2:
                return f"{flag}=1 on {x} of rank {rank}"
    return None


def _transposed(b, x: str) -> str:
    rank = b.ctx.rank(x)
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    return b.op("Transpose", [x], perm=perm)


def replace(node, b) -> None:
    a, w = node.input[0], node.input[1]
    if attr(node, "transA", 0):
        a = _transposed(b, a)
    if attr(node, "transB", 0):
        w = _transposed(b, w)
    alpha = float(attr(node, "alpha", 1.0))
    if alpha == 1.0:
        b.op("MatMul", [a, w], [node.output[0]])
    else:
        b.op("Mul", [b.op("MatMul", [a, w]), b.f32(alpha)], [node.output[0]])


FUSED_MATMUL = Rule("FusedMatMul", MS, check, replace, strict_only=True)
