"""SoftmaxCrossEntropyLossGrad lowered equals the training build's kernel, for the cases of the forward's test:
reductions mean, sum and none, ignore_index=-100 rows (and only ignored rows), no ignore_index, class weights,
[N, C, D] log-probabilities."""

from ._testing import check, lowered
from .softmax_cross_entropy_loss_test import sce_model


def test_softmax_cross_entropy_loss_grad_matches_kernel(tmp_path):
    model, feeds = sce_model("SoftmaxCrossEntropyLossGrad", 7)
    diffs = check(model, feeds, tmp_path, "SoftmaxCrossEntropyLossGrad", strict_too=False)
    print("SoftmaxCrossEntropyLossGrad max abs diff", diffs)


def test_no_one_hot():
    """The label term is one ScatterElements into p·s: the only [rows, C] tensors are exp(log p), p·s and the
    result (no one-hot, no mask of that size)."""
    model, _ = sce_model("SoftmaxCrossEntropyLossGrad", 7)
    low, _ = lowered(model)
    ops = [n.op_type for n in low.graph.node]
    assert "OneHot" not in ops and "Range" not in ops
    for node in low.graph.node:
        if node.op_type == "Exp":
            readers = [n.op_type for n in low.graph.node if node.output[0] in n.input]
            assert sorted(readers) == ["GatherElements", "Mul"]
