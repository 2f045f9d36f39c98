"""LARS pass on a LoRA linear exported like the real models (TorchScript) and differentiated by ORT itself: the
rewritten gradient equals the projected formula, computed independently in numpy."""

import numpy as np
import onnx
import pytest

from lars_export.passes import PassContext
from lars_export.passes._testing import export_sequence_model, lora_linear, ort_train_step
from lars_export.passes.lars_projection import LARS_PROJECTION

D, R, V, T = 12, 3, 9, 7
A_NAME, B_NAME = "q_proj.lora_A.default.weight", "q_proj.lora_B.default.weight"


def _export(tmp_path, rng):
    """logits = x·Wᵀ + 2·(x·Aᵀ)·Bᵀ with x = Embedding(ids)·G: a LoRA linear in PEFT's parameter layout."""
    import torch

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(20, D)
            self.mix = torch.nn.Linear(D, D, bias=False)
            self.q_proj = lora_linear(D, V, R)

        def forward(self, ids):
            return self.q_proj(self.mix(self.embed(ids)))

    model = Tiny()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.from_numpy(rng.normal(size=tuple(p.shape)).astype(np.float32)))
    values = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
    return export_sequence_model(model, tmp_path / "fwd.onnx", T), values


def _grads(directory, ids, labels):
    _, grads = ort_train_step(directory, [ids, labels], priority_order=False)
    return {n: grads[n] for n in (A_NAME, B_NAME)}


def _artifacts(tmp_path, rng):
    from lars_export import training_graphs

    model, values = _export(tmp_path, rng)
    training_graphs.generate(model, [A_NAME, B_NAME], tmp_path)
    return values


@pytest.mark.parametrize("k", [4, D])
def test_rewritten_gradient_is_the_projected_formula(tmp_path, k):
    rng = np.random.default_rng(0)
    v = _artifacts(tmp_path, rng)
    ids = rng.integers(0, 20, size=T).astype(np.int64)
    labels = rng.integers(0, V, size=T).astype(np.int64)
    exact = _grads(tmp_path, ids, labels)

    basis = np.linalg.qr(rng.normal(size=(D, D)))[0][:, :k].astype(np.float32)  # orthonormal columns
    training = onnx.load(str(tmp_path / "training_model.onnx"))
    report = LARS_PROJECTION.run(training, PassContext(trainable={A_NAME, B_NAME}, lars_bases={A_NAME: basis}))
    assert report.changed == 1 and report.skipped == []
    assert report.bytes_freed == 4 * (D - k) and report.freed_per == "token"
    onnx.save(training, str(tmp_path / "training_model.onnx"))
    lars = _grads(tmp_path, ids, labels)

    # Independent reference in numpy: mean cross-entropy, dxa = dlogits·B·s, dA = dxaᵀ·(x·P·Pᵀ).
    x = v["embed.weight"][ids] @ v["mix.weight"].T
    logits = x @ v["q_proj.base_layer.weight"].T + 2.0 * (x @ v[A_NAME].T) @ v[B_NAME].T
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    dlogits = (probs - np.eye(V)[labels]) / T
    dxa = 2.0 * dlogits @ v[B_NAME]
    np.testing.assert_allclose(exact[A_NAME], dxa.T @ x, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(lars[A_NAME], dxa.T @ (x @ basis @ basis.T), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(lars[B_NAME], exact[B_NAME], rtol=1e-6)  # dB does not change
    if k == D:
        np.testing.assert_allclose(lars[A_NAME], exact[A_NAME], rtol=1e-4, atol=1e-6)
    else:
        assert not np.allclose(lars[A_NAME], exact[A_NAME], rtol=1e-3)


def test_skips_an_adapter_without_basis_and_says_why(tmp_path):
    _artifacts(tmp_path, np.random.default_rng(0))
    training = onnx.load(str(tmp_path / "training_model.onnx"))
    other = {"k_proj.lora_A.default.weight": np.eye(D, dtype=np.float32)}
    report = LARS_PROJECTION.run(training, PassContext(trainable={A_NAME, B_NAME}, lars_bases=other))
    assert report.changed == 0 and report.skipped == [f"{A_NAME}: no basis for this adapter"]
    report = LARS_PROJECTION.run(training, PassContext(trainable={A_NAME, B_NAME}))
    assert report.changed == 0 and report.skipped == ["no bases: exact LoRA (--lars-basis none)"]
