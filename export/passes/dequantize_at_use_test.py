"""Dequantize at use on ORT's training graph of a quantized two-block model: before the pass the backward reads
the forward's float32 matrices (so they outlive the forward); after it, each backward reader has its own copy,
made after its gradient input exists, and the loss and gradients are bit-identical."""

import numpy as np
import onnx
import pytest

from lars_export.passes import PassContext
from lars_export.passes._ir import backward_nodes, ir_graph, run_order
from lars_export.passes._testing import TWO_BLOCK_TRAINABLE as TRAINABLE
from lars_export.passes._testing import export_lm, ort_train_step, two_block_lm
from lars_export.passes.dequantize_at_use import DEQUANTIZE_AT_USE
from lars_export.passes.pretranspose_frozen import PRETRANSPOSE_FROZEN
from lars_export.passes._dequantized import dequantized_weights, kept_for_backward
from lars_export.passes.quantize_frozen import QUANTIZE_FROZEN


def _step(root, ids, labels):
    loss, grads = ort_train_step(root, [ids, labels])
    return loss, {n: grads[n] for n in sorted(TRAINABLE)}


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_backward_readers_get_their_own_copies(tmp_path, scheme):
    from lars_export import training_graphs

    rng = np.random.default_rng(0)
    forward = export_lm(two_block_lm(rng, 32, 64, 2, 50, 40), tmp_path / "fwd.onnx")
    context = PassContext(trainable=TRAINABLE, quantize=scheme, quantize_block=32)
    PRETRANSPOSE_FROZEN.run(forward, context)
    QUANTIZE_FROZEN.run(forward, context)
    training_graphs.generate(forward, sorted(TRAINABLE), tmp_path)
    ids = rng.integers(0, 50, size=(2, 6)).astype(np.int64)
    labels = rng.integers(0, 40, size=12).astype(np.int64)
    loss_before, grads_before = _step(tmp_path, ids, labels)

    training = onnx.load(str(tmp_path / "training_model.onnx"))
    kept = kept_for_backward(training)
    # The input gradient of every frozen MatMul below a trainable tensor reads its weight: layer 1's up, gate and
    # down, layer 0's down, and the output projection.
    assert len(kept) == 5

    report = DEQUANTIZE_AT_USE.run(training, context)
    assert report.changed == 5 and report.skipped == []
    assert kept_for_backward(training) == set()
    # Each copy waits for a tensor the backward makes (a gradient), so ORT cannot run it during the forward.
    graph = ir_graph(training)
    backward = set(backward_nodes(graph))
    copies = {t: gate for t, (_, gate) in dequantized_weights(graph).items()
              if any(use.node in backward for use in t.uses())}
    assert len(copies) == 5 and all(gate.producer() in backward for gate in copies.values())

    onnx.save(training, str(tmp_path / "training_model.onnx"))
    loss_after, grads_after = _step(tmp_path, ids, labels)
    assert loss_after == loss_before
    for name in grads_before:
        np.testing.assert_array_equal(grads_after[name], grads_before[name])


def test_does_nothing_without_quantized_weights(tmp_path):
    from lars_export import training_graphs

    forward = export_lm(two_block_lm(np.random.default_rng(0), 32, 64, 2, 50, 40), tmp_path / "fwd.onnx")
    PRETRANSPOSE_FROZEN.run(forward, PassContext(trainable=TRAINABLE))
    training_graphs.generate(forward, sorted(TRAINABLE), tmp_path)
    training = onnx.load(str(tmp_path / "training_model.onnx"))
    nodes = len(training.graph.node)
    assert DEQUANTIZE_AT_USE.run(training, PassContext(trainable=TRAINABLE)).changed == 0
    assert len(training.graph.node) == nodes


def test_run_order_follows_ort_priority_and_finds_cycles():
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])
    graph = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["b"], name="first"),  # the lowest index among the ready nodes
         helper.make_node("Relu", ["x"], ["a"], name="third"),
         helper.make_node("Size", ["b"], ["s"], name="second"),  # Shape and Size go first once ready
         helper.make_node("Add", ["a", "b"], ["y"], name="fourth")],
        "g", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])])
    model = helper.make_model(graph)
    assert [n.name for n in run_order(ir_graph(model))] == ["first", "second", "third", "fourth"]
    model.graph.node[0].input[0] = "y"  # first <- fourth <- first
    with pytest.raises(ValueError, match="cycle through"):
        run_order(ir_graph(model))
