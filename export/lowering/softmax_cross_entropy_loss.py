"""SoftmaxCrossEntropyLoss -> LogSoftmax + GatherElements, masked and reduced as the node says.

A standard op, but plain onnxruntime runs it as its ONNX function body, which keeps one more [rows, vocab] tensor
alive per loss (measured: +96 MB per loss chunk). The rewrite holds one: the log-probabilities (which are also its
optional second output, when read).

    log p = LogSoftmax(logits, axis 1)
    valid = label != ignore_index, safe = valid ? label : 0          (without ignore_index: every label is valid)
    loss_i = valid_i · −log p[i, safe_i] (· weight[safe_i])
    none: loss_i   sum: Σ loss_i   mean: Σ loss_i / max(#valid, 1)   (with weights: / Σ valid weight, unless 0)

as ORT's kernel computes it (its mean of an all-ignored batch is 0, not NaN).
"""

from __future__ import annotations

from onnx import TensorProto

from ._rule import Rule, attr, has_input

REDUCTIONS = ("mean", "sum", "none")


def check(node, ctx) -> str | None:
    if len(node.input) < 2 or not all(node.input[:2]):
        return "it lacks scores or labels"
    reduction = attr(node, "reduction", "mean")
    if reduction not in REDUCTIONS:
        return f"reduction {reduction!r} is not one of {', '.join(REDUCTIONS)}"
    if ctx.elem_type(node.input[0]) not in (None, TensorProto.FLOAT):
        return "only float32 scores are lowered"
    return None


def labels(b, label: str, ignore_index) -> tuple[str, str | None]:
    """(labels safe to gather with: ignored ones replaced by 0, the valid mask or None when nothing is ignored)."""
    label = b.int64(label)
    if ignore_index is None:
        return label, None
    valid = b.op("Not", [b.op("Equal", [label, b.i64(int(ignore_index))])])
    return b.op("Where", [valid, label, b.i64(0)]), valid


def row_weights(b, weight: str | None, safe: str, valid: str | None) -> str | None:
    """weight[label] of each row, 0 for ignored rows (None without a weight input)."""
    if weight is None:
        return None
    w = b.op("Gather", [weight, safe], axis=0)
    return b.op("Where", [valid, w, b.f32(0.0)]) if valid is not None else w


def mean_divisor(b, safe: str, valid: str | None, w: str | None) -> str:
    """What ORT's mean divides by: Σ valid weight (unless 0) or the valid count (at least 1: 0 rows give 0)."""
    if w is not None:
        total = b.reduce("ReduceSum", w, None, keepdims=0)
        return b.op("Where", [b.op("Equal", [total, b.f32(0.0)]), b.f32(1.0), total])
    if valid is None:
        count = b.op("Cast", [b.op("Size", [safe])], to=TensorProto.FLOAT)
    else:
        count = b.reduce("ReduceSum", b.op("Cast", [valid], to=TensorProto.FLOAT), None, keepdims=0)
    return b.op("Max", [count, b.f32(1.0)])


def replace(node, b) -> None:
    scores, label = node.input[0], node.input[1]
    weight = node.input[2] if has_input(node, 2) else None
    reduction = attr(node, "reduction", "mean")
    loss = node.output[0]
    log_prob = node.output[1] if len(node.output) > 1 and node.output[1] else None
    logp = b.op("LogSoftmax", [scores], [log_prob] if log_prob else None, axis=1)
    safe, valid = labels(b, label, attr(node, "ignore_index"))
    picked = b.squeeze(b.op("GatherElements", [logp, b.unsqueeze(safe, [1])], axis=1), [1])
    w = row_weights(b, weight, safe, valid)
    last = [loss] if reduction == "none" else None
    if w is not None:
        per_row = b.op("Mul", [b.op("Neg", [picked]), w], last)
    elif valid is not None:
        per_row = b.op("Where", [valid, b.op("Neg", [picked]), b.f32(0.0)], last)
    else:
        per_row = b.op("Neg", [picked], last)
    if reduction == "sum":
        b.reduce("ReduceSum", per_row, None, keepdims=0, output=[loss])
    elif reduction == "mean":
        total = b.reduce("ReduceSum", per_row, None, keepdims=0)
        b.op("Div", [total, mean_divisor(b, safe, valid, w)], [loss])


SOFTMAX_CROSS_ENTROPY_LOSS = Rule("SoftmaxCrossEntropyLoss", "", check, replace)
