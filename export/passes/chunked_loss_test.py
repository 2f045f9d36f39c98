"""Chunked loss on a LoRA model exported like the real ones (TorchScript, flattened logits, ORT's loss block):
loss and gradients equal PyTorch autograd's at lengths below, at and above the chunk count, with ignored labels;
no [tokens, vocab] tensor is saved for the backward, in the stored graph and in the one ORT runs."""

import copy

import numpy as np
import onnx
import pytest

from lars_export.passes import PassContext
from lars_export.passes._ir import ir_graph, values_by_name
from lars_export.passes._testing import lora_linear, ort_train_step, saved
from lars_export.passes.chunked_loss import CHUNKED_LOSS
from lars_export.passes.pretranspose_frozen import PRETRANSPOSE_FROZEN

D, R, V, CHUNKS = 8, 2, 13, 3
A_NAME, B_NAME = "mix.lora_A.default.weight", "mix.lora_B.default.weight"


def _model(rng):
    import torch

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(20, D)
            self.mix = lora_linear(D, D, R)
            self.lm_head = torch.nn.Linear(D, V, bias=False)

        def forward(self, ids):  # [batch, T] -> [batch * T, V], as lars' exporter flattens them
            return self.lm_head(torch.tanh(self.mix(self.embed(ids)))).reshape(-1, V)

    model = Tiny()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.from_numpy(rng.normal(size=tuple(p.shape)).astype(np.float32)))
    return model


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    import torch

    from lars_export import training_graphs

    model = _model(np.random.default_rng(0))
    root = tmp_path_factory.mktemp("chunked")
    torch.onnx.export(model, (torch.zeros((1, 5), dtype=torch.int64),), str(root / "fwd.onnx"), input_names=["ids"],
                      output_names=["logits"], dynamic_axes={"ids": {0: "B", 1: "T"}, "logits": {0: "BT"}},
                      opset_version=17, do_constant_folding=False, dynamo=False)
    forward = onnx.load(str(root / "fwd.onnx"))
    PRETRANSPOSE_FROZEN.run(forward, PassContext(trainable={A_NAME, B_NAME}))  # as the exporter does
    for name in ("exact", "chunked"):
        (root / name).mkdir()
        training_graphs.generate(copy.deepcopy(forward), [A_NAME, B_NAME], root / name)  # it takes the weights
    training = onnx.load(str(root / "chunked" / "training_model.onnx"))
    report = CHUNKED_LOSS.run(training, PassContext(trainable={A_NAME, B_NAME}, loss_chunks=CHUNKS))
    onnx.save(training, str(root / "chunked" / "training_model.onnx"))
    return model, root, report



def _vocab_sized_saved(model) -> list[str]:
    """Saved tensors made by the head MatMul, the loss or a log-softmax: the [tokens, vocab] ones."""
    head = {n.output[0] for n in model.graph.node if n.op_type in ("MatMul", "FusedMatMul")
            and any("lm_head" in i for i in n.input)}
    return sorted(name for name, made_by in saved(model).items() if name in head
                  or made_by.op_type in ("SoftmaxCrossEntropyLoss", "LogSoftmax"))


@pytest.mark.parametrize("batch, length, prompt", [(1, 2, 1), (1, 3, 1), (2, 7, 1), (3, 11, 1), (3, 11, 25)])
def test_chunked_loss_and_gradients_equal_autograd(bundles, batch, length, prompt):
    """Labelled rows below / at / above the chunk count; the first `prompt` rows carry no label (prompt, padding)
    and never reach the vocabulary projection."""
    import torch

    model, root, report = bundles
    assert report.changed == 1 and report.details["chunks"] == CHUNKS
    rng = np.random.default_rng(length)
    ids = rng.integers(0, 20, size=(batch, length)).astype(np.int64)
    labels = rng.integers(0, V, size=batch * length).astype(np.int64)
    labels[:prompt] = -100  # ignored (prompt / padding) positions
    ours, grads = ort_train_step(root / "chunked", [ids, labels])
    graph = onnx.load(str(root / "chunked" / "training_model.onnx"), load_external_data=False)
    outputs = [o.name for o in graph.graph.output if not o.name.endswith("_grad.accumulation.out")]
    assert len(outputs) == 1  # the loss only: the training graph no longer outputs logits

    model.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(ids)), torch.from_numpy(labels),
                                             ignore_index=-100)
    loss.backward()
    params = dict(model.named_parameters())
    np.testing.assert_allclose(ours, loss.item(), rtol=1e-5)
    for name in (A_NAME, B_NAME):
        np.testing.assert_allclose(grads[name], params[name].grad.numpy(), rtol=1e-4, atol=1e-6)


def test_no_vocabulary_sized_tensor_is_saved_for_the_backward(bundles, tmp_path):
    _, root, _ = bundles
    exact = onnx.load(str(root / "exact" / "training_model.onnx"), load_external_data=False)
    assert _vocab_sized_saved(exact)  # the check can fail: ORT's own loss saves its log-probabilities
    chunked = onnx.load(str(root / "chunked" / "training_model.onnx"), load_external_data=False)
    assert _vocab_sized_saved(chunked) == []
    assert "logits" not in {o.name for o in chunked.graph.output}

    # In the graph ORT optimises and runs, every chunk's two projections stay (z and the unit gradient's dh, both in
    # the forward; common-subexpression elimination merged none), the backward recomputes none, and still nothing
    # vocabulary-sized is saved.
    ids = np.arange(10, dtype=np.int64).reshape(2, 5) % 20
    ort_train_step(root / "chunked", [ids, np.arange(10, dtype=np.int64) % V], optimized_to=tmp_path / "optimized.onnx")
    optimized = onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False)
    projections = [n for n in optimized.graph.node if n.op_type in ("MatMul", "FusedMatMul")
                   and any("lm_head" in i for i in n.input)]
    assert len(projections) == 2 * CHUNKS
    values = values_by_name(ir_graph(optimized))
    for dh in [n for n in projections if n.op_type == "FusedMatMul"]:  # dz·W of the unit seed 1 / K, not of dloss
        grad = values[dh.input[0]].producer()
        assert grad.op_type == "SoftmaxCrossEntropyLossGrad" and grad.inputs[0].producer().op_type == "Reciprocal"
    assert sum(n.op_type == "SoftmaxCrossEntropyLossGrad" for n in optimized.graph.node) == CHUNKS
    assert _vocab_sized_saved(optimized) == []


def test_runs_whole_below_two_chunks_and_says_so(bundles):
    _, root, _ = bundles
    training = onnx.load(str(root / "exact" / "training_model.onnx"), load_external_data=False)
    report = CHUNKED_LOSS.run(training, PassContext(trainable={A_NAME, B_NAME}, loss_chunks=1))
    assert report.changed == 0 and report.skipped == ["--loss-chunks 1: the loss runs whole"]
