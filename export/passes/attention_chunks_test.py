"""Chunked attention on a causal multi-head attention block exported like the real models (TorchScript), with LoRA
on q, k and v so ORT differentiates through Q, Kᵀ and V: gradients equal PyTorch autograd's and the unchunked
graph's; no probabilities outlive the forward; each group waits for the previous one; ORT's optimiser merges no
group back (the graph it runs still holds every group's Softmax)."""

import numpy as np
import onnx
import pytest

from lars_export.passes import PassContext
from lars_export.passes._base import producers, saved_for_backward
from lars_export.passes._testing import attention_lm, ort_module
from lars_export.passes.attention_chunks import ATTENTION_CHUNKS

D, H, R, V, T = 16, 4, 2, 11, 6
TRAINABLE = {f"attn.{m}.lora_{ab}.default.weight" for m in ("q_proj", "k_proj", "v_proj") for ab in "AB"}


def _model(rng):
    return attention_lm(rng, D, H, R, 20, V, adapted=("q_proj", "k_proj", "v_proj"))


@pytest.fixture(scope="module")
def exact(tmp_path_factory):
    import torch

    from lars_export import ort_artifacts

    root = tmp_path_factory.mktemp("attention_chunks")
    model = _model(np.random.default_rng(0))
    torch.onnx.export(model, (torch.zeros(T, dtype=torch.int64),), str(root / "fwd.onnx"), input_names=["ids"],
                      output_names=["logits"], dynamic_axes={"ids": {0: "T"}, "logits": {0: "T"}}, opset_version=17,
                      do_constant_folding=False, dynamo=False)
    ort_artifacts.generate(onnx.load(str(root / "fwd.onnx")), sorted(TRAINABLE), root)
    return model, root


def _grads(directory, ids, labels):
    C, state, module = ort_module(directory)
    out = C.OrtValueVector()
    module.train_step([ids, labels], out)
    return float(out[0].numpy()), {n: state.get_parameter(n).grad.numpy().copy() for n in TRAINABLE}


def _saved_softmax(model) -> list[str]:
    prod = producers(model)
    return sorted(t for t in saved_for_backward(model) if prod[t].op_type == "Softmax")


@pytest.mark.parametrize("groups", [2, 3, H])  # 3: uneven groups of 2, 1 and 1 heads
def test_chunked_attention_gives_autograd_gradients(exact, tmp_path, groups):
    import shutil

    import torch

    model, root = exact
    rng = np.random.default_rng(groups)
    ids = rng.integers(0, 20, size=T).astype(np.int64)
    labels = rng.integers(0, V, size=T).astype(np.int64)
    exact_loss, exact_grads = _grads(root, ids, labels)

    for name in ("training_model.onnx", "checkpoint", "eval_model.onnx", "optimizer_model.onnx"):
        shutil.copy(root / name, tmp_path / name)
    training = onnx.load(str(tmp_path / "training_model.onnx"))
    assert len(_saved_softmax(training)) == 1
    report = ATTENTION_CHUNKS.apply(training, PassContext(trainable=TRAINABLE, attention_chunks=groups,
                                                          attention_heads=H))
    assert report.changed == 1 and report.skipped == [], report.skipped
    assert _saved_softmax(training) == []
    assert sum(n.op_type == "Softmax" for n in training.graph.node) == 2 * groups  # forward + backward per group
    # Each group after the first waits for the previous group's result (forward: its output; backward: its dQ).
    for stage, last in (("fwd", "o"), ("bwd", "dq")):
        for g in range(1, groups):
            gate = next(n for n in training.graph.node if n.name.endswith(f"AttentionChunks/{stage}/g{g}/GateSize"))
            assert gate.input[0].endswith(f"{stage}/g{g - 1}/{last}"), gate.input[0]
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
        np.testing.assert_array_equal(grads[name], exact_grads[name])  # per-head products are the same products

    # The graph ORT runs: every group's two Softmax nodes are still there and nothing saves probabilities.
    ort_module(tmp_path, optimized_to=tmp_path / "optimized.onnx")
    optimized = onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False)
    assert sum(n.op_type == "Softmax" for n in optimized.graph.node) == 2 * groups
    assert _saved_softmax(optimized) == []


def test_one_group_leaves_the_attention_whole(exact):
    _, root = exact
    training = onnx.load(str(root / "training_model.onnx"))
    report = ATTENTION_CHUNKS.apply(training, PassContext(trainable=TRAINABLE, attention_chunks=1, attention_heads=H))
    assert report.changed == 0 and "attention runs whole" in report.skipped[0]


def test_export_flag():
    from lars_export.cli import build_parser
    from lars_export.config import ExportConfig
    from lars_export.passes import enabled_passes

    assert build_parser().parse_args(["m", "--attention-chunks", "9"]).attention_chunks == 9
    assert "attention_chunks" in enabled_passes(ExportConfig(attention_chunks=9))
