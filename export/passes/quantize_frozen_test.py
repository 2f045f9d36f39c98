"""Quantized frozen weights on a two-block LoRA model exported like the real ones (TorchScript, blocks named
layers.N, flattened logits, ORT's loss block): loss and LoRA gradients equal PyTorch autograd's on the same model
with its frozen weights replaced by their numpy-dequantized values, alone and with the other memory passes; ORT
neither folds a dequantization back into a float32 initializer nor keeps a dequantized matrix for the backward."""

import numpy as np
import onnx
import pytest

from lars_export import quantization
from lars_export.passes import PassContext, run_passes
from lars_export.passes._testing import TWO_BLOCK_TRAINABLE as TRAINABLE
from lars_export.passes._testing import export_lm, ort_train_step, two_block_lm
from lars_export.passes.dequantize_at_use import most_alive
from lars_export.passes.pretranspose_frozen import PRETRANSPOSE_FROZEN
from lars_export.passes._dequantized import dequantized_weights, kept_for_backward
from lars_export.passes.quantize_frozen import QUANTIZE_FROZEN

D, F, R, V, VOCAB, BLOCK = 32, 64, 2, 40, 50, 32


def _dequantized_reference(model, scheme: str):
    """The model with each frozen matrix replaced by numpy's quantize -> dequantize of it (nn.Linear stores Wᵀ of
    the graph's [in, out] weight; the output projection and the embedding are INT8 in both schemes)."""
    import copy

    import torch

    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_" in name:
                continue
            w = p.detach().numpy()
            if name == "embed.weight":
                deq = quantization.dequantize_int8(*quantization.int8_per_channel(w, axis=0), axis=0)
            elif scheme == "int4" and name != "lm_head.weight":
                deq = quantization.dequantize_int4(*quantization.int4_blockwise(w.T, BLOCK)).T
            else:
                deq = quantization.dequantize_int8(*quantization.int8_per_channel(w.T, axis=1), axis=1).T
            assert not np.array_equal(deq, w)  # the reference really is quantized
            p.copy_(torch.from_numpy(np.ascontiguousarray(deq)))
    return ref


def _build(root, model, scheme: str, passes: tuple[str, ...]):
    from lars_export import training_graphs

    root.mkdir()
    forward = export_lm(model, root / "fwd.onnx")
    context = PassContext(trainable=TRAINABLE, loss_chunks=3, quantize=scheme, quantize_block=BLOCK)
    PRETRANSPOSE_FROZEN.run(forward, context)
    report = QUANTIZE_FROZEN.run(forward, context)
    training_graphs.generate(forward, sorted(TRAINABLE), root)
    reports = training_graphs.rewrite_training_model(
        root, lambda m: run_passes(m, context, "training", enabled={*passes, "dequantize_at_use"}))
    return report, {r.name: r for r in reports}


def _step(root, ids, labels):
    loss, grads = ort_train_step(root, [ids, labels])
    return loss, {n: grads[n] for n in TRAINABLE}


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("passes", [(), ("layer_recompute", "chunked_loss")])
def test_quantized_bundle_trains_like_autograd_on_dequantized_weights(tmp_path, scheme, passes):
    import torch

    rng = np.random.default_rng(0)
    model = two_block_lm(rng, D, F, R, VOCAB, V)
    report, training_reports = _build(tmp_path / "bundle", model, scheme, passes)
    assert report.changed == 8 and report.skipped == []  # embed, 2 × (up, gate, down), lm_head
    assert report.details["matrices"] == ({"int8": 8, "int4": 0} if scheme == "int8" else {"int8": 2, "int4": 6})
    assert report.details["stored_bytes"] < report.details["float32_bytes"] / (3.5 if scheme == "int8" else 4.5)
    assert report.freed_per == "bundle"
    assert report.bytes_freed == report.details["float32_bytes"] - report.details["stored_bytes"]
    for name in passes:
        assert training_reports[name].changed, training_reports[name].skipped

    ids = rng.integers(0, VOCAB, size=(2, 7)).astype(np.int64)
    labels = rng.integers(0, V, size=14).astype(np.int64)
    labels[:3] = -100
    loss, grads = _step(tmp_path / "bundle", ids, labels)

    ref = _dequantized_reference(model, scheme)
    ref_loss = torch.nn.functional.cross_entropy(ref(torch.from_numpy(ids)), torch.from_numpy(labels),
                                                 ignore_index=-100)
    ref_loss.backward()
    params = dict(ref.named_parameters())
    assert loss == pytest.approx(ref_loss.item(), rel=1e-5)
    for name in TRAINABLE:
        np.testing.assert_allclose(grads[name], params[name].grad.numpy(), rtol=1e-4, atol=1e-6)

    # The graph ORT runs: no dequantization folded back into a float32 initializer, none duplicated, and no
    # dequantized matrix kept from the forward for the backward.
    stored = onnx.load(str(tmp_path / "bundle" / "training_model.onnx"))
    ort_train_step(tmp_path / "bundle", [ids, labels], optimized_to=tmp_path / "optimized.onnx")
    optimized = onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False)
    big_floats = [i.name for i in optimized.graph.initializer if i.data_type == onnx.TensorProto.FLOAT
                  and int(np.prod(i.dims)) >= 1024]
    assert big_floats == []
    assert len(dequantized_weights(optimized)) == len(dequantized_weights(stored))
    if "chunked_loss" in passes:
        # The loss' chunks run one after the other, each reading the projection twice (its logits and its dh, both
        # in the forward): one dequantized output projection for all of them, not one per read (3 chunks x 2).
        head = [t for t, (chain, _) in dequantized_weights(stored).items()
                if any(i is not None and i.name.startswith("/lm_head/Transpose_output_0")
                       for n in chain for i in n.inputs)]
        assert len(head) == 1, head
    for graph in (stored, optimized):
        assert kept_for_backward(graph) == set()
    # In the order ORT runs the step, one float32 copy of a layer matrix exists at a time: a recomputed layer's
    # forward and backward readers of a matrix (the whole layer's backward between them) get one copy each.
    assert most_alive(stored) == 1


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_a_tied_table_is_stored_once_and_looked_up_by_column(tmp_path, scheme):
    """Tied embeddings: pretranspose_frozen points the lookups at the output projection's [hidden, vocab] copy, and
    this pass stores that one matrix INT8 per vocabulary column for both readers (never INT4): loss and gradients
    equal autograd's on the dequantized model, and the bundle holds one INT8 vocabulary matrix."""
    import torch

    rng = np.random.default_rng(3)
    model = two_block_lm(rng, D, F, R, VOCAB, VOCAB)
    model.lm_head.weight = model.embed.weight
    report, _ = _build(tmp_path / "bundle", model, scheme, ("layer_recompute", "chunked_loss"))
    assert report.changed == 7 and report.skipped == []  # 2 × (up, gate, down) and the one vocabulary matrix
    assert report.details["matrices"] == ({"int8": 7, "int4": 0} if scheme == "int8" else {"int8": 1, "int4": 6})
    graph = onnx.load(str(tmp_path / "bundle" / "eval_model.onnx"))
    vocab = [i for i in graph.graph.initializer if i.data_type == onnx.TensorProto.INT8 and VOCAB in i.dims]
    assert [list(i.dims) for i in vocab] == [[D, VOCAB]]
    lookups = [n for n in graph.graph.node if n.op_type == "Gather" and n.input[0] == vocab[0].name]
    assert len(lookups) == 1 and lookups[0].attribute[0].i == 1

    ids = rng.integers(0, VOCAB, size=(2, 7)).astype(np.int64)
    labels = rng.integers(0, VOCAB, size=14).astype(np.int64)
    loss, grads = _step(tmp_path / "bundle", ids, labels)
    ref = _dequantized_reference(model, scheme)
    ref_loss = torch.nn.functional.cross_entropy(ref(torch.from_numpy(ids)), torch.from_numpy(labels))
    ref_loss.backward()
    params = dict(ref.named_parameters())
    assert loss == pytest.approx(ref_loss.item(), rel=1e-5)
    for name in TRAINABLE:
        np.testing.assert_allclose(grads[name], params[name].grad.numpy(), rtol=1e-4, atol=1e-6)


def test_round_trip_error_is_bounded_and_int4_is_exact_on_its_own_grid():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(64, 24)).astype(np.float32)
    q, scale = quantization.int8_per_channel(w, axis=1)
    assert q.dtype == np.int8 and scale.shape == (24,)
    assert np.all(np.abs(quantization.dequantize_int8(q, scale, axis=1) - w) <= scale / 2 + 1e-7)

    packed, s, m = quantization.int4_blockwise(w, 32)
    assert packed.shape == (32, 24) and packed.dtype == np.uint8 and s.shape == m.shape == (2, 1, 24)
    err = np.abs(quantization.dequantize_int4(packed, s, m) - w).reshape(2, 32, 24)
    assert np.all(err <= s.astype(np.float32) / 2 + 1e-3)  # half a step (+ float16 rounding of the minimum)

    # Values on a float16 grid q·s + m with q spanning 0..15 in every block (GGUF's Q4_1) come back exactly.
    grid_q = rng.integers(0, 16, size=(64, 24))
    grid_q[0::32], grid_q[1::32] = 0, 15
    scale16 = rng.uniform(0.01, 0.1, size=(2, 1, 24)).astype(np.float16)
    min16 = rng.uniform(-1, 0, size=(2, 1, 24)).astype(np.float16)
    on_grid = (grid_q.reshape(2, 32, 24) * scale16.astype(np.float32) + min16.astype(np.float32)).reshape(64, 24)
    np.testing.assert_array_equal(quantization.dequantize_int4(*quantization.int4_blockwise(on_grid, 32)), on_grid)


def test_export_flag():
    from lars_export.cli import build_parser
    from lars_export.config import ExportConfig
    from lars_export.passes import enabled_passes

    assert build_parser().parse_args(["m"]).quantize_weights == "none"
    assert build_parser().parse_args(["m", "--quantize-weights", "int4"]).quantize_weights == "int4"
    assert {"quantize_frozen", "dequantize_at_use"} & enabled_passes(ExportConfig()) == set()
    assert {"quantize_frozen", "dequantize_at_use"} <= enabled_passes(ExportConfig(quantize_weights="int8"))
