"""SoftmaxCrossEntropyLossGrad -> (exp(log p) − onehot(label))·s, s the per-row scale of ORT's kernel.

    s_i = valid_i · dY_i (· weight[label_i])        reduction none
    s_i = valid_i · dY / D (· weight[label_i])       mean (D as the forward's: valid count or Σ valid weight)
    s_i = valid_i · dY (· weight[label_i])           sum

The one-hot term is one ScatterElements of (p[i, label_i] − 1)·s_i into p·s at the label columns, not a
[rows, vocab] one-hot: one [rows, vocab] tensor at a time besides the input, as the kernel.
"""

from __future__ import annotations

from onnx import TensorProto

from ._rule import MS, Rule, attr, has_input
from .softmax_cross_entropy_loss import REDUCTIONS, labels, mean_divisor


def check(node, ctx) -> str | None:
    if len(node.input) < 3 or not all(node.input[:3]):
        return "it lacks dY, log_prob or label"
    reduction = attr(node, "reduction", "mean")
    if reduction not in REDUCTIONS:
        return f"reduction {reduction!r} is not one of {', '.join(REDUCTIONS)}"
    if has_input(node, 4) and ctx.constant(node.input[4]) is None:
        return "its ignore_index input is not a constant"
    if ctx.elem_type(node.input[1]) not in (None, TensorProto.FLOAT):
        return "only float32 log-probabilities are lowered"
    return None


def replace(node, b) -> None:
    dy, log_prob, label = node.input[0], node.input[1], node.input[2]
    weight = node.input[3] if has_input(node, 3) else None
    reduction = attr(node, "reduction", "mean")
    ignore_index = attr(node, "ignore_index")
    if has_input(node, 4):
        ignore_index = int(b.ctx.constant(node.input[4]))
    safe, valid = labels(b, label, ignore_index)
    w = b.op("Gather", [weight, safe], axis=0) if weight is not None else None
    scale = dy
    if reduction == "mean":
        masked_w = b.op("Where", [valid, w, b.f32(0.0)]) if (w is not None and valid is not None) else w
        scale = b.op("Div", [dy, mean_divisor(b, safe, valid, masked_w)])
    if w is not None:
        scale = b.op("Mul", [w, scale])
    if valid is not None:
        scale = b.op("Where", [valid, scale, b.f32(0.0)])
    per_row = reduction == "none" or w is not None or valid is not None  # else a scalar, broadcast as it is
    if per_row:
        scale = b.unsqueeze(scale, [1])
    index = b.unsqueeze(safe, [1])
    p = b.op("Exp", [log_prob])
    at_label = b.op("Mul", [b.op("Sub", [b.op("GatherElements", [p, index], axis=1), b.f32(1.0)]), scale])
    scaled = b.op("Mul", [p, scale])
    b.op("ScatterElements", [scaled, index, at_label], [node.output[0]], axis=1)


SOFTMAX_CROSS_ENTROPY_LOSS_GRAD = Rule("SoftmaxCrossEntropyLossGrad", MS, check, replace)
