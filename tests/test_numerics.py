"""Our ORT artifacts against PyTorch + PEFT on the same weights and batch: first-step loss and every LoRA gradient."""

import json

import numpy as np
import onnx
import pytest

from lars_artifacts import load_bundle
from lars_ort import Trainer
from tiny import compare_with_peft


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_loss_and_every_lora_gradient_match_peft(arch, tiny_models, tiny_bundles):
    compare_with_peft(tiny_models[arch], tiny_bundles[arch])


@pytest.mark.parametrize("arch", ["llama3", "gemma3"])
def test_other_families_with_the_default_passes_match_peft(arch, tiny_models, tmp_path):
    """Llama 3.x (rope scaling, untied head) and Gemma 3 (sliding-window layer, q/k norms, tanh GELU exported as
    x·σ(2u), scaled embeddings) with the exporter's default passes but exact LoRA: loss and gradients as PEFT's on the
    unmodified model, run on plain onnxruntime (the tanh GELU's SigmoidGrad lowered)."""
    from lars_export import ExportConfig, export

    bundle = export(ExportConfig(model=str(tiny_models[arch]), out=str(tmp_path / "b"), lora_rank=4, lora_alpha=8,
                                 lars_basis="none"))
    manifest = load_bundle(bundle).manifest
    assert manifest.architecture["model_type"] == {"llama3": "llama", "gemma3": "gemma3_text"}[arch]
    changed = {p["name"]: p["changed"] for p in manifest.passes}
    assert changed["attention_chunks"] == 2 and changed["chunked_loss"] == 1  # both layers' attention matched
    if arch == "gemma3":  # one tanh GELU per layer, its gradient lowered for plain onnxruntime
        assert manifest.models["ort"]["lowering"]["lowered"]["SigmoidGrad"] == 2
    compare_with_peft(tiny_models[arch], bundle)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "llama3", "gemma3"])
def test_the_lowest_memory_exact_stack_matches_peft(arch, tiny_models, tmp_path):
    """Chunked attention (one head at a time, each in three chunks of query rows), layer recompute and the chunked
    loss together, on the real architectures (their 4-D causal masks sliced by rows): still exact."""
    from lars_export import ExportConfig, export

    bundle = export(ExportConfig(model=str(tiny_models[arch]), out=str(tmp_path / "b"), lora_rank=4, lora_alpha=8,
                                 lars_basis="none", attention_chunks=4, attention_row_chunks=3,
                                 recompute_layers=True, loss_chunks=3))
    reports = {p["name"]: p for p in load_bundle(bundle).manifest.passes}
    changed = {name: p["changed"] for name, p in reports.items()}
    assert reports["attention_chunks"]["details"]["row_chunks"] == 3
    assert changed["attention_chunks"] == 2 and changed["layer_recompute"] == 2 and changed["chunked_loss"] == 1
    assert changed["attention_recompute"] == 0  # nothing left to recompute
    # The causal chunks' bounds and mask blocks are cut once per mask for every layer, forward and backward, and
    # the layer copies read them ungated (a gate is three nodes per layer): the residual stream and the rotary tables
    # (unsqueezed before they meet Q) wait behind gates, the causal plan does not.
    training = onnx.load(str(bundle / "training_model.onnx"), load_external_data=False)
    masks = {n.input[0] for n in training.graph.node if n.name.endswith("/RowsMask")}
    assert 1 <= len(masks) <= 2  # gemma3: the sliding-window layers' mask and the global layers'
    assert sum(n.name.endswith("/RowsMask") for n in training.graph.node) == 3 * len(masks)
    assert not any("AttentionChunks" in n.name and n.op_type == "Shape" and n.input[0] in masks
                   for n in training.graph.node)
    gated = {layer: sorted(n.input[0] for n in training.graph.node
                           if n.name.startswith(f"/layer_recompute/layers.{layer}/in") and n.op_type == "Unsqueeze")
             for layer in (0, 1)}
    for layer, inputs in gated.items():
        assert len(inputs) <= 3 and not any(t.startswith(tuple(masks)) for t in inputs), (layer, inputs)
    compare_with_peft(tiny_models[arch], bundle)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_every_adapter_tensor_is_its_own_trainable_parameter(arch, tiny_bundles):
    """The TorchScript exporter merges identical initializers; all-zero lora_B would collapse
    into a few shared parameters and train wrong (export/adapters.py)."""
    from lars_artifacts.ort_checkpoint import read_checkpoint
    from lars_export import ort_training

    bundle = load_bundle(tiny_bundles[arch])
    saved = read_checkpoint(bundle.file("checkpoint"))
    trainable = [n for n, grad in saved.requires_grad.items() if grad]
    assert sorted(trainable) == sorted(ort_training.call("trainable_names", bundle.path / "checkpoint"))  # ORT's view
    expected = [p["onnx_name"] for p in bundle.manifest.adapter["parameters"]]
    assert sorted(trainable) == sorted(expected)
    assert len(set(trainable)) == 28
    # PEFT initialisation: B = 0, A random and distinct per module.
    for name in trainable:
        value = saved.parameters[name]
        if ".lora_B." in name:
            assert not value.any(), name
        else:
            assert value.std() > 0, name
    a_values = [saved.parameters[n].tobytes() for n in trainable if ".lora_A." in n]
    assert len(set(a_values)) == len(a_values)


def test_graph_takes_other_batch_sizes_and_lengths(tiny_models, tiny_bundles):
    """The eval graph at shapes other than the export's: its loss is the transformers model's own (lora_B is zero
    at export, so the adapted model is the base model)."""
    import torch
    from transformers import AutoModelForCausalLM

    trainer = Trainer(tiny_bundles["llama"], load_eval=True)
    reference = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32,
                                                     attn_implementation="eager").eval()
    for b, t in [(1, 5), (2, 33), (4, 64)]:
        ids = np.random.default_rng(t).integers(0, trainer.bundle.manifest.vocab_size, size=(b, t))
        loss = trainer.engine.eval_step(trainer.batch(ids))
        with torch.no_grad():
            expected = reference(torch.from_numpy(ids), labels=torch.from_numpy(ids)).loss.item()
        assert loss == pytest.approx(expected, rel=1e-5), (b, t)


def test_manifest_records_what_the_runtime_needs(tiny_bundles):
    bundle = load_bundle(tiny_bundles["qwen2"])
    m = bundle.manifest
    assert m.architecture["model_type"] == "qwen2" and m.architecture["num_hidden_layers"] == 2
    assert m.adapter["r"] == 4 and m.adapter["lora_alpha"] == 8
    assert m.io["inputs"] == ["input_ids", "attention_mask", "labels"]
    assert m.exporter["versions"]["onnx"] == "1.17.0"
    on_disk = json.loads((bundle.path / "manifest.json").read_text())
    assert set(on_disk["files"]) >= {"training_model.onnx", "eval_model.onnx", "checkpoint", "weights.onnx_data"}
    assert [p["name"] for p in m.passes] == ["pretranspose_frozen", "lars_projection", "attention_chunks",
                                             "attention_recompute", "chunked_loss", "cheap_recompute"]
    # both layers' attention in causal row chunks (nothing left to recompute); the one loss; per layer the MLP
    # activation and the repeated K and V
    assert [p["changed"] for p in m.passes[2:]] == [2, 0, 1, 6]
    assert m.passes[5]["details"]["chains"] == {"QuickGelu": 2, "Expand": 2, "Expand+Reshape+Transpose": 2}
    assert m.passes[2]["details"]["row_chunks"] == 8 and m.passes[2]["details"]["causal_skip"] is True
    assert m.io["training_outputs"] == ["loss"] and m.io["eval_outputs"] == ["loss", "logits"]
    assert m.adapter["lars"] == {"basis": "none", "rank": None, "calibration": None}
    assert m.passes[0]["changed"] == 2 * 7 + 1  # every frozen linear weight + the untied lm_head
