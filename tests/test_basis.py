"""The pca basis: the top-k eigensolver against LAPACK's full eigh, and the layer-by-layer calibration against one
ordinary forward of the whole model."""

from __future__ import annotations

import numpy as np
import pytest

from lars_export import basis


def _subspace_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosines of the principal angles between the column spans of two orthonormal d×k matrices."""
    return np.linalg.svd(a.T @ b, compute_uv=False)


def _moment(d: int, spectrum: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4 * d, d))
    if spectrum == "decaying":    # what real activations look like: a few strong directions, then a slow tail
        x *= 1.0 / np.sqrt(1 + np.arange(d))
    elif spectrum == "outliers":  # "massive activations": two dimensions ~1000x the rest
        x[:, :2] *= 1000.0
    x = x @ np.linalg.qr(rng.standard_normal((d, d)))[0]  # not axis-aligned
    return x.T @ x


@pytest.mark.parametrize("spectrum", ["decaying", "flat", "outliers"])
@pytest.mark.parametrize("d,k", [(200, 8), (500, 32)])
def test_top_eigenvectors_span_the_leading_eigenspace_of_full_eigh(spectrum, d, k):
    m = _moment(d, spectrum)
    values, vectors = np.linalg.eigh(m)
    values, vectors = values[::-1], vectors[:, ::-1]
    assert 8 * (k + max(8, k // 2)) < d  # the iterative path, not the small-problem fallback to eigh
    top = basis.top_eigenvectors(m, k)
    assert top.shape == (d, k)
    np.testing.assert_allclose(top.T @ top, np.eye(k), atol=1e-10)
    assert _subspace_cosines(top, vectors[:, :k]).min() > 1 - 1e-8
    # each column is the eigenvector of the same rank (up to sign): the basis is ordered by variance
    np.testing.assert_allclose(np.einsum("dk,de,ek->k", top, m, top), values[:k], rtol=1e-8)


def test_top_eigenvectors_of_a_small_matrix_take_full_eigh():
    m = _moment(40, "decaying")
    top = basis.top_eigenvectors(m, 8)
    vectors = np.linalg.eigh(m)[1][:, ::-1][:, :8]
    assert _subspace_cosines(top, vectors).min() > 1 - 1e-12


def _activations(tokens: int, d: int, spectrum: str, seed: int = 0) -> np.ndarray:
    """float32 rows [tokens, d] with the spectrum's shape (see _moment), as the calibration forward gathers them."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, d))
    if spectrum == "decaying":
        x *= 1.0 / np.sqrt(1 + np.arange(d))
    elif spectrum == "outliers":
        x *= 1.0 / np.sqrt(1 + np.arange(d))
        x[:, :2] *= 1000.0
    return np.ascontiguousarray((x @ np.linalg.qr(rng.standard_normal((d, d)))[0]).astype(np.float32))


@pytest.mark.parametrize("spectrum", ["decaying", "flat"])
def test_principal_directions_from_the_activations_equal_full_eigh_of_the_float64_moment(spectrum, monkeypatch):
    """The wide-input path (Krylov blocks xᵀ(x·q) in float32, no d×d moment) against LAPACK on the exact moment."""
    x = _activations(3000, 1800, spectrum)
    x64 = x.astype(np.float64)
    m = x64.T @ x64
    values, vectors = np.linalg.eigh(m)
    values, vectors = values[::-1], vectors[:, ::-1]
    k = 32
    assert basis.solves_on_activations(1800, k)  # pca_basis takes this path at this width
    assert not basis.solves_on_activations(1536, k)  # SmolLM2's widest input (the default bundle) does not
    monkeypatch.setattr(basis, "_moment", lambda x: pytest.fail("the wide-input path formed the d×d moment"))
    top = basis.pca_basis(x, k)
    assert top.shape == (1800, k) and top.dtype == np.float32
    np.testing.assert_allclose(top.T @ top, np.eye(k), atol=1e-6)
    exact = basis.top_principal_directions(x, k)  # float64, before pca_basis's float32 cast
    assert _subspace_cosines(exact, vectors[:, :k]).min() > 1 - 1e-8
    np.testing.assert_allclose(np.einsum("dk,de,ek->k", exact, m, exact), values[:k], rtol=1e-7)


def test_principal_directions_of_outlier_activations_fall_back_to_the_moment(caplog):
    """Two dimensions ~1000× the rest (θ₁/θ₃₂ ~ 10⁷): float32 products cannot bring the tail pairs to tol, so the
    residuals stall and the moment is solved instead — the exporter's answer before the wide-input path existed."""
    x = _activations(3000, 1800, "outliers")
    with caplog.at_level("DEBUG", logger="lars_export.basis"):
        top = basis.top_principal_directions(x, 32)
    assert "solving the float64 moment" in caplog.text
    np.testing.assert_array_equal(top, basis.top_eigenvectors(basis._moment(x), 32))
    # the float32 moment limits either path here: the tail directions are near, not exact; the energy is kept
    x64 = x.astype(np.float64)
    m = x64.T @ x64
    values = np.linalg.eigvalsh(m)[::-1][:32]
    assert np.einsum("dk,de,ek->", top, m, top) > (1 - 1e-6) * values.sum()


def _reference_moments(peft_model, batches) -> dict[str, np.ndarray]:
    """Σ xᵀx per adapter from ordinary forwards of the whole model (float64, no shared-input shortcut)."""
    import torch

    sums: dict[str, np.ndarray] = {}
    hooks = []
    for name, module in basis.lora_modules(peft_model).items():
        def hook(mod, args, name=name):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double().numpy()
            sums[name] = sums.get(name, 0) + x.T @ x
        hooks.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad(), peft_model.disable_adapter():
            for ids in batches:
                peft_model(input_ids=torch.tensor([ids]), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return sums


def _peft_model(tiny_models, arch: str, targets: list[str]):
    """A tiny saved model with LoRA r=4 on `targets`, and its tokenizer."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32)
    return (get_peft_model(model, LoraConfig(r=4, target_modules=targets, task_type="CAUSAL_LM")),
            AutoTokenizer.from_pretrained(tiny_models[arch]))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen2-sliding", "gemma3"])
def test_layer_by_layer_calibration_sees_what_one_forward_of_the_model_sees(tiny_models, tmp_path, arch):
    """The layers are run one at a time on carried hidden states with the arguments the model passed each of them:
    the adapters' inputs must be those of an ordinary forward, including models whose layers get different masks
    (Qwen2 with a sliding window on its second layer; Gemma 3 with one on its first and per-layer-type rope, on
    batches longer than the window)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    if arch == "qwen2-sliding":
        torch.manual_seed(0)
        config = Qwen2Config(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=8,
                             layer_types=["full_attention", "sliding_attention"], attn_implementation="eager")
        model = Qwen2ForCausalLM(config)
        tok = AutoTokenizer.from_pretrained(tiny_models["qwen2"])
    else:
        model = AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(tiny_models[arch])
    weights = {k: v.clone() for k, v in model.state_dict().items()}  # before PEFT wraps the projections
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj", "up_proj",
                                                                       "down_proj"], task_type="CAUSAL_LM"))
    batches = basis.calibration_batches(tok, None, 300, seq_len=64)  # the last batch is shorter
    assert len({len(b) for b in batches}) == 2
    want = _reference_moments(peft_model, batches)
    got = basis.second_moments(peft_model, batches)
    assert set(got) == set(want) and len(got) == 2 * 5
    for name, moment in want.items():
        np.testing.assert_allclose(got[name], moment, rtol=2e-5, atol=1e-5 * np.abs(moment).max(), err_msg=name)
    # q and v read the same tensor: one gathered input serves both
    q = [n for n in got if ".q_proj." in n]
    assert all(got[n] is got[n.replace(".q_proj.", ".v_proj.")] for n in q)
    if arch == "qwen2-sliding":  # the sliding window changed what the second layer's o_proj saw
        full = Qwen2ForCausalLM(Qwen2Config(**{**config.to_dict(), "use_sliding_window": False,
                                               "layer_types": ["full_attention"] * 2}))
        full.load_state_dict(weights)
        unwindowed = _reference_moments(get_peft_model(full, LoraConfig(r=4, target_modules=["o_proj"],
                                                                        task_type="CAUSAL_LM")), batches)
        o1 = next(n for n in got if ".layers.1.self_attn.o_proj." in n)
        assert not np.allclose(unwindowed[o1], got[o1], rtol=1e-3)


def test_pca_basis_from_the_exporter_equals_full_eigh_of_the_moments(tiny_models):
    peft_model, tok = _peft_model(tiny_models, "qwen2", ["q_proj", "k_proj", "down_proj"])
    bases = basis.build_bases("pca", 8, peft_model, tok, calibration_tokens=1024)
    moments = _reference_moments(peft_model, basis.calibration_batches(tok, None, 1024))
    down = next(n for n in bases if ".down_proj." in n)
    assert bases[down].shape == (128, 8) and bases[down].dtype == np.float32
    for name, p in bases.items():
        vectors = np.linalg.eigh(moments[name])[1][:, ::-1][:, :8]
        assert _subspace_cosines(p.astype(np.float64), vectors).min() > 1 - 1e-5, name


def test_pca_basis_is_orthonormal_and_ranked_by_variance(tiny_models):
    """The exporter's pca basis: orthonormal columns, leading directions carry the most calibration energy."""
    peft_model, tok = _peft_model(tiny_models, "llama", ["q_proj", "k_proj", "down_proj"])
    bases = basis.build_bases("pca", 8, peft_model, tok, calibration_tokens=1024)
    moments = basis.second_moments(peft_model, basis.calibration_batches(tok, None, 1024))
    assert len(bases) == 6
    q = [n for n in moments if ".q_proj." in n]
    assert len(q) == 2 and not np.allclose(moments[q[0]], moments[q[1]])  # layers do not share inputs
    # q and k read the same tensor: one accumulation serves both, and it is the same matrix
    for qn in q:
        np.testing.assert_array_equal(moments[qn], moments[qn.replace(".q_proj.", ".k_proj.")])
    # and it equals the moment computed without the sharing shortcut (a hook on k alone)
    k_only, _ = _peft_model(tiny_models, "llama", ["k_proj"])
    alone = basis.second_moments(k_only, basis.calibration_batches(tok, None, 1024))
    for name, m in alone.items():
        np.testing.assert_allclose(moments[name], m, rtol=1e-10)
    down = [n for n in moments if ".down_proj." in n]
    assert moments[down[0]].shape == (128, 128)
    for name, p in bases.items():
        np.testing.assert_allclose(p.T @ p, np.eye(p.shape[1]), atol=1e-5)
        energy = np.einsum("dk,de,ek->k", p, moments[name], p)
        assert (np.diff(energy) <= 1e-6 * energy[0]).all()  # descending
        random = basis.random_basis(p.shape[0], 8, 0)
        q = np.linalg.qr(random)[0]
        assert energy.sum() > np.einsum("dk,de,ek->k", q, moments[name], q).sum()
