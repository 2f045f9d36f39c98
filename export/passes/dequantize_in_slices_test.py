"""Dequantize in slices on ORT's training graph of an INT8 two-block model with the chunked loss: the output
projection's whole float32 copy is gone, every reader (each loss chunk, forward and backward) gets it slice by
slice with each slice made after the previous one was used, and loss and gradients equal those before."""

import numpy as np
import onnx
import pytest

from lars_export.passes import PassContext
from lars_export.passes import dequantize_in_slices as slices_pass
from lars_export.passes._ir import gate_of, ir_graph, values_by_name
from lars_export.passes._testing import TWO_BLOCK_TRAINABLE as TRAINABLE
from lars_export.passes._testing import export_lm, ort_train_step, two_block_lm
from lars_export.passes.chunked_loss import CHUNKED_LOSS
from lars_export.passes.dequantize_at_use import DEQUANTIZE_AT_USE
from lars_export.passes.dequantize_in_slices import DEQUANTIZE_IN_SLICES
from lars_export.passes.pretranspose_frozen import PRETRANSPOSE_FROZEN
from lars_export.passes._dequantized import dequantized_weights
from lars_export.passes.quantize_frozen import QUANTIZE_FROZEN

D, F, VOCAB, OUT, CHUNKS = 32, 64, 50, 200, 3


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_output_projection_is_dequantized_one_slice_at_a_time(tmp_path, monkeypatch, scheme):
    from lars_export import training_graphs

    rng = np.random.default_rng(0)
    forward = export_lm(two_block_lm(rng, D, F, 2, VOCAB, OUT), tmp_path / "fwd.onnx")
    context = PassContext(trainable=TRAINABLE, quantize=scheme, quantize_block=32, loss_chunks=CHUNKS)
    PRETRANSPOSE_FROZEN.run(forward, context)
    QUANTIZE_FROZEN.run(forward, context)  # int4 mode keeps the output projection INT8
    training_graphs.generate(forward, sorted(TRAINABLE), tmp_path)
    training = onnx.load(str(tmp_path / "training_model.onnx"))
    assert CHUNKED_LOSS.run(training, context).changed == 1
    onnx.save(training, str(tmp_path / "training_model.onnx"))
    ids = rng.integers(0, VOCAB, size=(2, 7)).astype(np.int64)
    labels = rng.integers(0, OUT, size=14).astype(np.int64)
    labels[3] = -100
    loss_before, grads_before = ort_train_step(tmp_path, [ids, labels])

    whole = [t for t in dequantized_weights(training) if "lm_head" in t.name]
    assert len(whole) == 1
    # the projection's 200 columns of 32 float32 (25,600 bytes) in slices of at most 10,240: 3 of 67, 67 and 66
    # columns; the layers' matrices (8,192 bytes) stay whole
    monkeypatch.setattr(slices_pass, "SLICE_BYTES", 10240)
    report = DEQUANTIZE_IN_SLICES.run(training, context)
    assert report.changed == 1 and report.skipped == [], report
    assert report.freed_per == "step" and report.bytes_freed == 4 * D * OUT - 4 * D * -(-OUT // 3)  # 2 of 3 slices
    (matrix,) = report.details["matrices"]
    # per chunk: the logits and dh = dz·Wᵀ (both in the forward: the chunked loss recomputes nothing)
    assert matrix["shape"] == [D, OUT] and matrix["slices"] == 3 and matrix["readers"] == 2 * CHUNKS
    # no whole float32 copy of the projection is left: only slice dequantizations
    assert not [t for t in dequantized_weights(training) if "lm_head" in t.name]
    deq = [n for n in training.graph.node if n.op_type == "DequantizeLinear" and "/Slices/" in n.name]
    assert len(deq) == 3 * 2 * CHUNKS
    # slice j+1 of a reader waits for slice j's product (its Slice start is gated on it)
    values = values_by_name(ir_graph(training))
    for node in deq:
        j = int(node.name.split("/Slices/")[1].split("/")[0])
        start = gate_of(values[node.input[0]].producer().inputs[1])  # SliceQ <- gated start
        gate_size = start.inputs[0].producer()  # the gate's axes <- Size(after)
        after = gate_size.inputs[0].name
        assert after.endswith(f"/Slices/{j - 1}/part") or (j > 0 and after.endswith(f"/Slices/{j - 1}/sum")) \
            if j else "/Slices/" not in after, (node.name, after)
    DEQUANTIZE_AT_USE.run(training, context)
    onnx.save(training, str(tmp_path / "training_model.onnx"))
    loss_after, grads_after = ort_train_step(tmp_path, [ids, labels])
    assert loss_after == pytest.approx(loss_before, rel=1e-6)
    for name, before in grads_before.items():
        np.testing.assert_allclose(grads_after[name], before, rtol=1e-5, atol=1e-6 * np.abs(before).max())


def test_small_matrices_stay_whole(tmp_path):
    from lars_export import training_graphs

    forward = export_lm(two_block_lm(np.random.default_rng(0), D, F, 2, VOCAB, OUT), tmp_path / "fwd.onnx")
    context = PassContext(trainable=TRAINABLE, quantize="int8", loss_chunks=CHUNKS)
    PRETRANSPOSE_FROZEN.run(forward, context)
    QUANTIZE_FROZEN.run(forward, context)
    training_graphs.generate(forward, sorted(TRAINABLE), tmp_path)
    training = onnx.load(str(tmp_path / "training_model.onnx"))
    nodes = len(training.graph.node)
    assert DEQUANTIZE_IN_SLICES.run(training, context).changed == 0  # 26 KB at most, far below SLICE_BYTES
    assert len(training.graph.node) == nodes
