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
    # every decoder matrix (2 layers x 7) and the embedding; the untied qwen2 head too (llama's is the embedding's
    # transposed copy, quantized as its own matrix)
    assert report["changed"] == 2 * 7 + 2 and report["skipped"] == []
    assert report["details"]["matrices"]["int4" if scheme == "int4" else "int8"] == (14 if scheme == "int4" else 16)
    assert manifest.adapter["frozen_weight_bytes"] < report["details"]["float32_bytes"] / (3 if scheme == "int8"
                                                                                           else 4)
    compare_with_peft(tiny_models[arch], bundle, dequantize=lambda model: dequantize_like_the_bundle(model, scheme))
