"""SoftmaxCrossEntropyLoss lowered (LogSoftmax + GatherElements) equals the training build's kernel: reductions
mean, sum and none, ignore_index=-100 rows (and a batch of only ignored rows), no ignore_index, class weights,
[N, C, D] scores, the log_prob output read or not."""

import numpy as np
from onnx import TensorProto, helper

from ._testing import check, lowered, make_model

IGNORE = -100
# name -> (scores shape, reduction, ignore_index, weighted, log_prob output)
CASES = {
    "mean": ((7, 11), "mean", IGNORE, False, True),
    "sum": ((7, 11), "sum", IGNORE, False, False),
    "none": ((7, 11), "none", IGNORE, False, True),
    "all_ignored": ((3, 11), "mean", IGNORE, False, False),
    "no_ignore": ((5, 11), "mean", None, False, False),
    "weighted_mean": ((7, 11), "mean", IGNORE, True, False),
    "weighted_sum": ((7, 11), "sum", IGNORE, True, True),
    "nd": ((3, 5, 4), "mean", IGNORE, False, True),
}


def labels_for(rng, shape, ignore_index, all_ignored=False):
    """Labels of scores `shape` ([N, C, ...]): random classes, a third of them ignored."""
    labels = rng.integers(0, shape[1], size=(shape[0], *shape[2:])).astype(np.int64)
    if ignore_index is not None:
        labels[rng.random(labels.shape) < 0.35] = ignore_index
        labels.flat[0] = ignore_index
        if all_ignored:
            labels[...] = ignore_index
    return labels


def sce_model(op_type: str, seed: int):
    """The cases' loss nodes (SoftmaxCrossEntropyLoss) or gradient nodes (SoftmaxCrossEntropyLossGrad of a
    LogSoftmax, dY random), their feeds and outputs."""
    rng = np.random.default_rng(seed)
    feeds, nodes, outputs, inits = {}, [], [], {}
    for name, (shape, reduction, ignore, weighted, log_prob) in CASES.items():
        feeds[f"x_{name}"] = (rng.normal(size=shape) * 3).astype(np.float32)
        feeds[f"t_{name}"] = labels_for(rng, shape, ignore, name == "all_ignored")
        attrs = {"reduction": reduction, **({} if ignore is None else {"ignore_index": ignore})}
        inputs = [f"x_{name}", f"t_{name}"]
        if weighted:
            inits[f"w_{name}"] = rng.uniform(0.2, 2.0, size=shape[1]).astype(np.float32)
            inputs.append(f"w_{name}")
        if op_type == "SoftmaxCrossEntropyLoss":
            outs = [f"loss_{name}"] + ([f"logp_{name}"] if log_prob else [])
            nodes.append(helper.make_node("SoftmaxCrossEntropyLoss", inputs, outs, name=f"sce_{name}", **attrs))
            outputs += outs
        else:
            dy_shape = feeds[f"t_{name}"].shape if reduction == "none" else ()
            feeds[f"dy_{name}"] = rng.normal(size=dy_shape).astype(np.float32)
            nodes += [helper.make_node("LogSoftmax", [f"x_{name}"], [f"logp_{name}"], axis=1),
                      helper.make_node("SoftmaxCrossEntropyLossGrad",
                                       [f"dy_{name}", f"logp_{name}", f"t_{name}", *inputs[2:]], [f"dx_{name}"],
                                       domain="com.microsoft", name=f"sce_grad_{name}", **attrs)]
            outputs.append(f"dx_{name}")
    return make_model(nodes, feeds, outputs, inits), feeds


def test_softmax_cross_entropy_loss_matches_kernel(tmp_path):
    model, feeds = sce_model("SoftmaxCrossEntropyLoss", 6)
    diffs = check(model, feeds, tmp_path, "SoftmaxCrossEntropyLoss", strict_too=False)
    print("SoftmaxCrossEntropyLoss max abs diff", diffs)


def test_one_vocabulary_sized_tensor():
    """Per loss: one [rows, C] tensor (LogSoftmax), however the loss is reduced; only GatherElements reads it."""
    model, _ = sce_model("SoftmaxCrossEntropyLoss", 6)
    low, _ = lowered(model)
    for name in CASES:
        big = [n for n in low.graph.node if n.op_type in ("LogSoftmax", "Exp", "Sub", "Mul", "Where")
               and f"x_{name}" in n.input]
        assert [n.op_type for n in big] == ["LogSoftmax"], name
    assert not any(n.op_type in ("OneHot", "NegativeLogLikelihoodLoss", "SoftmaxCrossEntropyLoss")
                   for n in low.graph.node)
    assert all(o.type.tensor_type.elem_type == TensorProto.FLOAT for o in low.graph.output)
