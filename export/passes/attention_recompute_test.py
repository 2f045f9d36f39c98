"""Attention recompute on a causal attention block exported like the real models (TorchScript), differentiated by
ORT itself: gradients equal PyTorch autograd's, and no attention probability outlives the forward, in the stored
graph and in the graph ORT optimises and runs."""

import numpy as np
import onnx
import pytest

from lars_export.passes import PassContext
from lars_export.passes._testing import attention_lm, ort_train_step, saved, training_artifacts
from lars_export.passes.attention_recompute import ATTENTION_RECOMPUTE

D, H, R, V, T = 8, 2, 2, 11, 6
A_NAME, B_NAME = "attn.q_proj.lora_A.default.weight", "attn.q_proj.lora_B.default.weight"


def _model(rng, squash: bool = False):
    return attention_lm(rng, D, H, R, 20, V, squash=squash)


def _artifacts(tmp_path, model):
    training_artifacts(model, [A_NAME, B_NAME], tmp_path, T)



def _grads(directory, ids, labels):
    loss, grads = ort_train_step(directory, [ids, labels])
    return loss, {n: grads[n] for n in (A_NAME, B_NAME)}


def _saved_softmax(model) -> list[str]:
    return sorted(name for name, made_by in saved(model).items() if made_by.op_type == "Softmax")


def test_recomputed_attention_gives_autograd_gradients_and_frees_the_probabilities(tmp_path):
    import torch

    rng = np.random.default_rng(0)
    model = _model(rng)
    _artifacts(tmp_path, model)
    ids = rng.integers(0, 20, size=T).astype(np.int64)
    labels = rng.integers(0, V, size=T).astype(np.int64)
    exact_loss, exact = _grads(tmp_path, ids, labels)

    training = onnx.load(str(tmp_path / "training_model.onnx"))
    assert len(_saved_softmax(training)) == 1  # the exact graph keeps the probabilities for the backward
    report = ATTENTION_RECOMPUTE.run(training, PassContext(trainable={A_NAME, B_NAME}))
    assert report.changed == 1 and report.skipped == []
    assert _saved_softmax(training) == []
    onnx.save(training, str(tmp_path / "training_model.onnx"))
    loss, grads = _grads(tmp_path, ids, labels)

    # Independent reference: PyTorch autograd on the same module and batch.
    logits = model(torch.from_numpy(ids))
    torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels)).backward()
    params = dict(model.named_parameters())
    for name in (A_NAME, B_NAME):
        reference = params[name].grad.numpy()
        np.testing.assert_allclose(grads[name], reference, rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(grads[name], exact[name])  # same kernels, same values
    assert loss == exact_loss

    # The graph ORT actually runs: its optimisations (fusion, common-subexpression elimination) must neither merge
    # the copy back into the forward nor leave a forward Softmax read by the backward.
    ort_train_step(tmp_path, [ids, labels], optimized_to=tmp_path / "optimized.onnx")
    optimized = onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False)
    assert sum(n.op_type == "Softmax" for n in optimized.graph.node) == 2  # forward + recompute
    assert _saved_softmax(optimized) == []


def test_leaves_an_unrecognised_chain_alone_and_says_why(tmp_path):
    _artifacts(tmp_path, _model(np.random.default_rng(0), squash=True))
    training = onnx.load(str(tmp_path / "training_model.onnx"))
    report = ATTENTION_RECOMPUTE.run(training, PassContext(trainable={A_NAME, B_NAME}))
    assert report.changed == 0 and len(report.skipped) == 1
    assert "Tanh between the scores and the Softmax is not recomputable" in report.skipped[0]
    assert len(_saved_softmax(training)) == 1


@pytest.mark.parametrize("flag, expected", [([], True), (["--no-recompute-attention"], False)])
def test_export_flag_switches_the_pass(flag, expected):
    from lars_export.cli import build_parser
    from lars_export.config import ExportConfig
    from lars_export.passes import enabled_passes

    args = build_parser().parse_args(["model", *flag])
    assert args.recompute_attention is expected
    assert ("attention_recompute" in enabled_passes(ExportConfig(recompute_attention=expected))) is expected
