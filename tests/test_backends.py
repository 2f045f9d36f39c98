"""The two backends train alike: plain onnxruntime on the bundle's standard-ONNX step (this process) against
onnxruntime-training 1.19.2's own Module and AdamW Optimizer on ORT's artifacts (a child process with the training
build: lars_export.ort_training). Losses of 20 steps, every adapter gradient at the last step (B is random from the
start: with B = 0 every dA is 0 at step 1 and would hide errors), the adapters after the last update; and a run
checkpoint written by either backend continues on the other."""

import numpy as np
import pytest

from lars_artifacts import load_bundle
from lars_artifacts.ort_checkpoint import read_checkpoint
from lars_export import ExportConfig, export, ort_training
from lars_ort import Trainer

STEPS, LR = 20, 3e-3
COMBINATIONS = {
    "exact": dict(lars_basis="none", recompute_attention=False, loss_chunks=0),
    "default": dict(lars_basis="random", lars_rank=16),  # LARS + attention recompute + chunked loss
    "stack-int8": dict(lars_basis="none", attention_chunks=4, attention_row_chunks=2, recompute_layers=True,
                       loss_chunks=3, quantize_weights="int8"),
    "int4-strict": dict(lars_basis="random", lars_rank=16, quantize_weights="int4", strict_onnx=True),
}


@pytest.fixture(scope="module")
def bundles(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("backends")
    return {(arch, name): export(ExportConfig(model=str(tiny_models[arch]), out=str(root / f"{arch}-{name}"),
                                              lora_rank=4, lora_alpha=8, **options))
            for arch in ("llama", "qwen2") for name, options in COMBINATIONS.items()}


def _feeds(trainer, path, adapters):
    rng = np.random.default_rng(3)
    ids = rng.integers(1, trainer.bundle.manifest.vocab_size, size=(2, 24))
    mask = np.ones_like(ids)
    mask[1, 17:] = 0  # a right-padded row
    batch = trainer.batch(ids, mask)
    batch.labels[0, :5] = -100  # prompt positions without loss
    np.savez(path, input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels.reshape(-1),
             **{f"param:{n}": v for n, v in adapters.items()})
    return batch


def _random_b(trainer):
    rng = np.random.default_rng(1)
    adapters = trainer.adapter_tensors()
    for name in adapters:
        if ".lora_B." in name:
            adapters[name] = rng.normal(0, 0.05, adapters[name].shape).astype(np.float32)
    return adapters


def _close(ours, ref, name, tolerance):
    """Equal up to float32 rounding: |ours - ref| <= tolerance * max|ref|, and parallel (cosine in float64)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    scale = np.abs(ref).max()
    np.testing.assert_allclose(ours, ref, rtol=0, atol=tolerance * scale + 1e-12, err_msg=name)
    cosine = float((ours * ref).sum() / (np.linalg.norm(ours) * np.linalg.norm(ref) + 1e-30))
    assert cosine > 1 - 1e-8 or scale == 0, (name, cosine)


# Measured on these bundles (|diff| / max|ref|): gradients at steps 1 and 2 <= 1e-6, the loss <= 1e-7 relative,
# gradients at step 20 <= 3e-5 and adapters <= 3e-6: ORT 1.32's kernels sum in other orders than 1.19's, and 20
# Adam steps magnify that rounding (m/sqrt(v) of a near-zero gradient). A wrong lowering is off by 1e-2 or more.
GRADIENT_EARLY, GRADIENT_LATE, ADAPTER = 3e-6, 1e-4, 1e-5


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("combination", list(COMBINATIONS))
def test_plain_onnxruntime_trains_like_onnxruntime_training(bundles, tmp_path, arch, combination):
    bundle = load_bundle(bundles[(arch, combination)])
    trainer = Trainer(bundle, load_eval=False)
    assert trainer.engine.backend == "ort"
    adapters = _random_b(trainer)
    trainer.engine.set_adapter_tensors(adapters)
    batch = _feeds(trainer, tmp_path / "feeds.npz", adapters)

    losses, grads = [], []
    for _ in range(STEPS):
        losses.append(trainer.step(batch, LR))
        grads.append(trainer.engine.gradients())  # the update leaves the gradient buffer as it was

    ort_training.call("train_steps", bundle.path, None, tmp_path / "feeds.npz", STEPS, LR, tmp_path / "ref.npz")
    ref = np.load(tmp_path / "ref.npz")
    np.testing.assert_allclose(losses, ref["loss"], rtol=1e-6)
    assert losses[-1] < losses[0] - 0.05  # it learns
    finals = trainer.adapter_tensors()
    for name in trainer.engine.adapter_names:
        for step, tolerance in ((0, GRADIENT_EARLY), (1, GRADIENT_EARLY), (STEPS - 1, GRADIENT_LATE)):
            _close(grads[step][name], ref[f"grad:{name}"][step], f"step {step + 1} gradient {name}", tolerance)
        _close(finals[name], ref[f"param:{name}"], f"adapter {name}", ADAPTER)


def test_strict_onnx_leaves_no_contrib_op_and_the_default_only_shipped_ones(bundles):
    import onnx

    shipped = {"FusedMatMul", "QuickGelu", "SimplifiedLayerNormalization"}
    for (arch, name), path in bundles.items():
        step = onnx.load(str(path / "training_step.onnx"), load_external_data=False)
        extra = {n.op_type for n in step.graph.node if n.domain not in ("", "ai.onnx")}
        contrib_in_onnx_domain = {n.op_type for n in step.graph.node if n.op_type in shipped}
        if name.endswith("strict"):
            assert extra == set() and contrib_in_onnx_domain == set(), (arch, name)
        else:
            assert extra <= shipped, (arch, name, extra)


def test_a_run_continues_across_backends(bundles, tmp_path):
    """ORT's checkpoint after 3 of its steps, continued 3 steps by plain onnxruntime, equals ORT continuing itself;
    and plain onnxruntime's checkpoint continued by ORT equals plain onnxruntime continuing."""
    bundle = load_bundle(bundles[("llama", "default")])
    trainer = Trainer(bundle, load_eval=False)
    adapters = _random_b(trainer)
    batch = _feeds(trainer, tmp_path / "feeds.npz", adapters)
    ort_ckpt = tmp_path / "ort-step3"
    ort_training.call("train_steps", bundle.path, None, tmp_path / "feeds.npz", 3, LR, tmp_path / "a.npz", ort_ckpt)
    assert read_checkpoint(ort_ckpt).optimizer.step == 3
    np.savez(tmp_path / "batch.npz", input_ids=batch.input_ids, attention_mask=batch.attention_mask,
             labels=batch.labels.reshape(-1))  # no `param:` entries: the adapters come from the checkpoint
    ort_training.call("train_steps", bundle.path, ort_ckpt, tmp_path / "batch.npz", 3, LR, tmp_path / "b.npz")
    ort_continued = np.load(tmp_path / "b.npz")

    resumed = Trainer(bundle, load_eval=False, checkpoint=ort_ckpt)
    assert resumed.engine.step_count == 3
    losses = [resumed.step(batch, LR) for _ in range(3)]
    np.testing.assert_allclose(losses, ort_continued["loss"], rtol=1e-6)
    for name, value in resumed.adapter_tensors().items():
        _close(value, ort_continued[f"param:{name}"], name, ADAPTER)

    # The other way: plain onnxruntime's own checkpoint after its 6 steps, continued by ORT and by itself.
    plain_ckpt = tmp_path / "plain-step6"
    resumed.engine.save(plain_ckpt)
    ort_training.call("train_steps", bundle.path, plain_ckpt, tmp_path / "batch.npz", 2, LR, tmp_path / "c.npz")
    ort_after = np.load(tmp_path / "c.npz")
    plain_losses = [resumed.step(batch, LR) for _ in range(2)]
    np.testing.assert_allclose(plain_losses, ort_after["loss"], rtol=1e-6)
    for name, value in resumed.adapter_tensors().items():
        _close(value, ort_after[f"param:{name}"], name, ADAPTER)


def test_the_ort_training_backend_says_what_it_needs_on_plain_onnxruntime(bundles):
    from lars_artifacts import LarsError

    with pytest.raises(LarsError, match="--backend ort-training needs onnxruntime-training 1.19.2"):
        Trainer(bundles[("llama", "exact")], load_eval=False, backend="ort-training")
