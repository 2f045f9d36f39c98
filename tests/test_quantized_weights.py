"""Bundles with quantized frozen weights (`--quantize-weights`) against PyTorch + PEFT on the same model with its
frozen matrices replaced by their numpy quantize -> dequantize: first-step loss and every LoRA gradient."""

import numpy as np
import pytest
import torch

from lars_export import ExportConfig, export, quantization
from tiny import compare_with_peft

BLOCK = 32


def dequantize_like_the_bundle(model, scheme: str) -> None:
    """Replace a transformers model's frozen matrices in place by what a `scheme` bundle computes from its storage:
    decoder linears INT4 blocks (or INT8 per output channel), the embedding and output projection INT8 per row."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Embedding) or name.endswith("lm_head"):
                w = module.weight.numpy()  # [rows, hidden]: one scale per vocabulary row
                deq = quantization.dequantize_int8(*quantization.int8_per_channel(w, axis=0), axis=0)
            elif isinstance(module, torch.nn.Linear) and ".layers." in f".{name}":
                wt = module.weight.numpy().T  # the graph's [in, out]
                if scheme == "int4" and quantization.int4_fits(wt.shape, BLOCK):
                    deq = quantization.dequantize_int4(*quantization.int4_blockwise(wt, BLOCK)).T
                else:
                    deq = quantization.dequantize_int8(*quantization.int8_per_channel(wt, axis=1), axis=1).T
            else:
                continue
            module.weight.copy_(torch.from_numpy(np.ascontiguousarray(deq)))


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_quantized_bundle_matches_peft_on_dequantized_weights(arch, scheme, tiny_models, tmp_path):
    bundle = export(ExportConfig(model=str(tiny_models[arch]), out=str(tmp_path / "b"), lora_rank=4, lora_alpha=8,
                                 lars_basis="none", quantize_weights=scheme, quantize_block_size=BLOCK))
    from lars_artifacts import load_bundle

    manifest = load_bundle(bundle).manifest
    report = next(p for p in manifest.passes if p["name"] == "quantize_frozen")
    # every decoder matrix (2 layers x 7) and the output projection; the untied qwen2's embedding too (llama's tied
    # table is stored once: its lookups read the projection's [hidden, vocab] copy by column)
    vocab = 1 if arch == "llama" else 2
    assert report["changed"] == 2 * 7 + vocab and report["skipped"] == []
    assert report["details"]["matrices"] == ({"int8": 14 + vocab, "int4": 0} if scheme == "int8"
                                             else {"int8": vocab, "int4": 14})
    assert manifest.adapter["frozen_weight_bytes"] < report["details"]["float32_bytes"] / (3 if scheme == "int8"
                                                                                           else 4)
    compare_with_peft(tiny_models[arch], bundle, dequantize=lambda model: dequantize_like_the_bundle(model, scheme))


def test_one_dequantized_matrix_at_a_time_in_the_order_ort_runs(tiny_models, tmp_path):
    """With layer recompute, a recomputed layer's forward and backward readers of a matrix each get their own float32
    copy (the layer's whole backward runs between them): in the order plain onnxruntime actually runs the step
    (its profiler's kernel events), one dequantized matrix exists at a time, as passes._ir.run_order predicts."""
    import json
    from pathlib import Path

    import onnx

    from lars_artifacts import load_bundle
    from lars_export.passes.dequantize_at_use import most_alive
    from lars_export.passes._dequantized import dequantized_weights
    from lars_ort.data import Batch
    from lars_ort.engine_ort import OrtEngine

    out = export(ExportConfig(model=str(tiny_models["llama"]), out=str(tmp_path / "b"), lora_rank=4, lora_alpha=8,
                              lars_basis="none", quantize_weights="int8", recompute_layers=True, loss_chunks=2))
    bundle = load_bundle(out)
    engine = OrtEngine(bundle, load_eval=False, threads=1, profile_prefix=str(tmp_path / "step"))
    ids = np.random.default_rng(0).integers(1, bundle.manifest.vocab_size, size=(1, 24))
    engine.forward_backward(Batch(ids, np.ones_like(ids), np.roll(ids, -1, axis=1)))
    trace = json.loads(Path(engine.session.end_profiling()).read_text())
    ran = [e["name"][: -len("_kernel_time")] for e in sorted(trace, key=lambda e: e["ts"])
           if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    at = {}
    for k, name in enumerate(ran):
        at.setdefault(name, k)

    step = onnx.load(bundle.file(engine.spec.training), load_external_data=False)
    spans = []
    for value, (chain, _) in dequantized_weights(step).items():
        made = [n.name for n in chain if n.op_type == "DequantizeLinear"]
        read = [use.node.name for use in value.uses()]
        assert made and read and all(n in at for n in made + read), (value.name, made, read)  # ran under its name
        spans.append((at[made[0]], max(at[r] for r in read)))
    assert len(spans) > 2 * 7  # the forward's, the recomputed forward's and the backward's copies
    alive = [sum(1 for s, e in spans if s <= k < e) for k in range(len(ran))]
    assert max(alive) == 1 == most_alive(step)
