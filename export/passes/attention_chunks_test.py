"""Chunked attention on a causal multi-head attention block exported like the real models (TorchScript), with LoRA
on q, k and v so ORT differentiates through Q, Kᵀ and V: gradients equal PyTorch autograd's and the unchunked
graph's; no probabilities outlive the forward; each group waits for the previous one; ORT's optimiser merges no
group back (the graph it runs still holds every group's Softmax)."""

import numpy as np
import onnx
import pytest

from lars_export.passes import PassContext
from lars_export.passes._ir import gate_of, ir_graph, values_by_name
from lars_export.passes._testing import attention_lm, ort_train_step, saved, training_artifacts
from lars_export.passes.attention_chunks import ATTENTION_CHUNKS

D, H, R, V, T = 16, 4, 2, 11, 6
TRAINABLE = {f"attn.{m}.lora_{ab}.default.weight" for m in ("q_proj", "k_proj", "v_proj") for ab in "AB"}


def _model(rng):
    return attention_lm(rng, D, H, R, 20, V, adapted=("q_proj", "k_proj", "v_proj"))


@pytest.fixture(scope="module")
def exact(tmp_path_factory):
    root = tmp_path_factory.mktemp("attention_chunks")
    model = _model(np.random.default_rng(0))
    training_artifacts(model, TRAINABLE, root, T)
    return model, root


def _grads(directory, ids, labels):
    loss, grads = ort_train_step(directory, [ids, labels])
    return loss, {n: grads[n] for n in TRAINABLE}


def _saved_softmax(model) -> list[str]:
    return sorted(name for name, made_by in saved(model).items() if made_by.op_type == "Softmax")


@pytest.mark.parametrize("groups, rows, causal", [(2, 0, False), (3, 0, False), (H, 0, False), (1, 4, False),
                                                 (3, 4, False), (H, T + 2, False), (1, 4, True), (3, 4, True),
                                                 (1, T, True), (H, T + 2, True)])
def test_chunked_attention_gives_autograd_gradients(exact, tmp_path, groups, rows, causal):
    """groups 3: uneven groups of 2, 1 and 1 heads; rows 4 of 6: chunks of 1, 2, 1, 2 query rows; rows T + 2: some
    chunks are empty (the first, with causal skipping, reads no keys at all). causal: each chunk reads only the keys
    before its end."""
    import shutil

    import torch

    model, root = exact
    rng = np.random.default_rng(groups + rows)
    ids = rng.integers(0, 20, size=T).astype(np.int64)
    labels = rng.integers(0, V, size=T).astype(np.int64)
    exact_loss, exact_grads = _grads(root, ids, labels)

    for name in ("training_model.onnx", "checkpoint", "eval_model.onnx", "optimizer_model.onnx", "weights.onnx_data"):
        shutil.copy(root / name, tmp_path / name)
    training = onnx.load(str(tmp_path / "training_model.onnx"))
    assert len(_saved_softmax(training)) == 1
    report = ATTENTION_CHUNKS.run(training, PassContext(trainable=TRAINABLE, attention_chunks=groups,
                                                          attention_heads=H, attention_row_chunks=rows,
                                                          causal_attention=causal))
    assert report.changed == 1 and report.skipped == [], report.skipped
    assert _saved_softmax(training) == []
    assert report.details["causal_skip"] == (causal and rows >= 2)
    # With skipping, chunk j's scores read the keys of Kᵀ sliced to the chunk's end; without, Kᵀ whole.
    key_slices = [n for n in training.graph.node if n.name.endswith("/KeysKt")]
    assert len(key_slices) == (2 * rows if causal else 0)
    pieces = groups * max(rows, 1)
    assert sum(n.op_type == "Softmax" for n in training.graph.node) == 2 * pieces  # forward + backward per piece
    # Each piece after the first waits for the previous piece's result (forward: its output; backward: its dQ):
    # the groups of heads in turn, and with row chunks, each chunk's groups in turn, then the next chunk's rows
    # (its bounds are gated, so its slices of Q, dO and the mask wait too).
    def gate_input(name):
        return next(n for n in training.graph.node if n.name.endswith(f"AttentionChunks/{name}/GateSize")).input[0]

    for stage, last in (("fwd", "o"), ("bwd", "dq")):
        for j in range(max(rows, 1)):
            r = f"r{j}" if rows >= 2 else ""
            for g in range(1, groups):
                assert gate_input(f"{stage}/{r}g{g}").endswith(f"{stage}/{r}g{g - 1}/{last}")
            if j:
                assert gate_input(f"{stage}/{r}/bounds").endswith(f"{stage}/r{j - 1}g{groups - 1}/{last}")
    # A backward piece's dP = dO·Vᵀ reads gated rows of dO (else ORT computes every piece's dP at once).
    values = values_by_name(ir_graph(training))
    for j in range(max(rows, 1)):
        r = f"r{j}" if rows >= 2 else ""
        for g in range(1, groups):
            dp = next(n for n in training.graph.node if n.name.endswith(f"AttentionChunks/bwd/{r}g{g}/dP"))
            assert gate_of(values[dp.input[0]]) is not None, dp.input[0]
    # And dQ, which the next piece waits for, comes after the piece's dKᵀ and dV (else ORT may defer them).
    for dq in [n for n in training.graph.node if n.name.endswith("/dQ") and "AttentionChunks/bwd/" in n.name]:
        gate = gate_of(values[dq.input[1]])
        assert gate is not None
        sizes = gate.inputs[0].producer()
        assert sizes.op_type == "Add" and len(sizes.inputs) == 2
        assert sorted(v.producer().inputs[0].name.rsplit("/", 1)[1] for v in sizes.inputs) == ["dkt", "dv"]
    onnx.save(training, str(tmp_path / "training_model.onnx"))
    loss, grads = _grads(tmp_path, ids, labels)

    logits = model(torch.from_numpy(ids))
    model.zero_grad()
    torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels)).backward()
    params = dict(model.named_parameters())
    assert loss == pytest.approx(exact_loss, rel=1e-6)
    for name in TRAINABLE:
        ref = params[name].grad.numpy()
        np.testing.assert_allclose(grads[name], ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
        if rows < 2:  # per-head products are the same products; row chunks sum dKᵀ and dV in another order
            np.testing.assert_array_equal(grads[name], exact_grads[name])
        else:
            np.testing.assert_allclose(grads[name], exact_grads[name], rtol=1e-5, atol=1e-6 * np.abs(ref).max())

    # The graph ORT runs: every group's two Softmax nodes are still there and nothing saves probabilities.
    ort_train_step(tmp_path, [ids, labels], optimized_to=tmp_path / "optimized.onnx")
    optimized = onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False)
    assert sum(n.op_type == "Softmax" for n in optimized.graph.node) == 2 * pieces
    assert _saved_softmax(optimized) == []


def test_one_group_leaves_the_attention_whole(exact):
    _, root = exact
    training = onnx.load(str(root / "training_model.onnx"))
    report = ATTENTION_CHUNKS.run(training, PassContext(trainable=TRAINABLE, attention_chunks=1, attention_heads=H,
                                                          attention_row_chunks=1))
    assert report.changed == 0 and "attention runs whole" in report.skipped[0]


def test_export_flag():
    from lars_export.cli import build_parser
    from lars_export.config import ExportConfig
    from lars_export.passes import enabled_passes

    assert build_parser().parse_args(["m", "--attention-chunks", "9"]).attention_chunks == 9
    assert build_parser().parse_args(["m", "--attention-row-chunks", "4"]).attention_row_chunks == 4
    assert "attention_chunks" in enabled_passes(ExportConfig(attention_chunks=9))
    assert "attention_chunks" in enabled_passes(ExportConfig(attention_row_chunks=4))
    assert "attention_chunks" in enabled_passes(ExportConfig())  # the default: causal row chunks
    assert "attention_chunks" not in enabled_passes(ExportConfig(attention_row_chunks=0))


def _core_chain() -> list:
    """An eager attention core as transformers writes it: (Q·Kᵀ)·scale + mask -> Softmax."""
    from onnx import helper

    return [helper.make_node("MatMul", ["q", "kt"], ["s"], name="Scores"),
            helper.make_node("Mul", ["s", "scale"], ["ss"], name="Scale"),
            helper.make_node("Add", ["ss", "mask"], ["sm"], name="Mask"),
            helper.make_node("Softmax", ["sm"], ["p"], name="Softmax", axis=-1)]


def _with_chunked_core(model, **options):
    """`model` (graph inputs q, kt, v, mask; initializer scale; output o) computing o by chunked_core from
    _core_chain(), built on onnx_ir as the pass builds it."""
    import onnx_ir as ir

    from lars_export.passes._ir import Nodes
    from lars_export.passes.attention_chunks import chunked_core

    model.graph.node.extend(_core_chain())
    ir_model = ir.serde.deserialize_model(model)
    graph = ir_model.graph
    chain = list(graph)
    nodes = chunked_core(Nodes(graph=graph), chain, 2, H, "core", "q", "kt", "v", {"o": "o"}, **options)
    graph.remove(chain, safe=True)
    graph.extend(nodes)
    graph.outputs[:] = [next(v for n in nodes for v in n.outputs if v.name == "o")]
    return ir.serde.serialize_model(ir_model)


@pytest.mark.parametrize("mask_rows", [T, 1])  # a causal mask, and one row broadcast to every query row
def test_row_chunks_slice_the_mask_rows_or_keep_a_broadcast_row(mask_rows):
    """The chunked forward on a hand-built core (onnx's reference evaluator): the mask's rows are sliced with the
    query rows when it has T of them, and its single row is reused when it broadcasts one."""
    from onnx import TensorProto, helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    hd, scale = 3, 0.5
    graph = helper.make_graph([], "core", [
        helper.make_tensor_value_info("q", TensorProto.FLOAT, [H, "T", hd]),
        helper.make_tensor_value_info("kt", TensorProto.FLOAT, [H, hd, "T"]),
        helper.make_tensor_value_info("v", TensorProto.FLOAT, [H, "T", hd]),
        helper.make_tensor_value_info("mask", TensorProto.FLOAT, [None, "T"])],
        [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array(scale, np.float32), "scale")])
    model = _with_chunked_core(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), rows=4)

    rng = np.random.default_rng(mask_rows)
    q, v = rng.normal(size=(2, H, T, hd)).astype(np.float32)
    kt = rng.normal(size=(H, hd, T)).astype(np.float32)
    mask = np.where(rng.random((mask_rows, T)) < 0.3, -1e9, 0).astype(np.float32)
    scores = q @ kt * scale + mask
    p = np.exp(scores - scores.max(-1, keepdims=True))
    expected = (p / p.sum(-1, keepdims=True)) @ v
    (o,) = ReferenceEvaluator(model).run(None, {"q": q, "kt": kt, "v": v, "mask": mask})
    np.testing.assert_allclose(o, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rows", [2, 4, T])
def test_causal_row_chunks_read_only_the_keys_before_their_end(rows):
    """With a causal mask (and padded keys hidden too), the skipping forward on the reference evaluator equals the
    whole softmax attention, and each chunk's scores are [rows of the chunk, keys up to its end]."""
    from onnx import TensorProto, helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    hd, scale = 3, 0.5
    graph = helper.make_graph([], "core", [
        helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, H, "T", hd]),
        helper.make_tensor_value_info("kt", TensorProto.FLOAT, [1, H, hd, "T"]),
        helper.make_tensor_value_info("v", TensorProto.FLOAT, [1, H, "T", hd]),
        helper.make_tensor_value_info("mask", TensorProto.FLOAT, [1, 1, "T", "T"])],
        [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array(scale, np.float32), "scale")])
    model = _with_chunked_core(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), rows=rows,
                               causal=True)
    model.graph.output.extend(helper.make_tensor_value_info(f"core/r{j}g0/scores", TensorProto.FLOAT, None)
                              for j in range(rows))

    rng = np.random.default_rng(rows)
    q, v = rng.normal(size=(2, 1, H, T, hd)).astype(np.float32)
    kt = rng.normal(size=(1, H, hd, T)).astype(np.float32)
    keys, queries = np.arange(T)[None, :], np.arange(T)[:, None]
    hidden = (keys > queries) | (keys == T - 1)  # causal, and the last key is padding
    mask = np.where(hidden, np.finfo(np.float32).min, 0).astype(np.float32)[None, None]
    scores = q @ kt * scale + mask
    p = np.exp(scores - scores.max(-1, keepdims=True))
    expected = (p / p.sum(-1, keepdims=True)) @ v
    o, *chunk_scores = ReferenceEvaluator(model).run(None, {"q": q, "kt": kt, "v": v, "mask": mask})
    np.testing.assert_allclose(o, expected, rtol=1e-5, atol=1e-6)
    cuts = [T * j // rows for j in range(rows + 1)]
    assert [s.shape[-2:] for s in chunk_scores] == [(cuts[j + 1] - cuts[j], cuts[j + 1]) for j in range(rows)]
