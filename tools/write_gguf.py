"""Write a Hugging Face Llama or Qwen2 folder as a GGUF file, the way llama.cpp's converter lays it out.

    python tools/write_gguf.py MODEL_DIR OUT.gguf [--type q8_0|q4_0|q4_1|f32]

Why: no 0.5B-or-larger GGUF of the families lars exports is in the package registries here, and `lars-export
MODEL.gguf` has its own load path (transformers' GGUF reader dequantizing every block), so timing it needs a real
GGUF file. This writes one from a config-built folder (tools/bench_export.py builds them): tensor names from gguf-py's
name map, Llama's q/k rows permuted as llama.cpp's converter does, 2-D weights quantized with gguf-py's block
quantizers (norms and biases stay float32, as llama.cpp keeps them), and the tokenizer's metadata copied from the
embedded SmolLM2 GGUF (a gpt2-style BPE; the folders bench_export builds carry SmolLM2's tokenizer). The config's
vocab_size is written as is, so a 151,936-row embedding is kept at its real size even though the tokenizer has 49,152
tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ARCHES = {"llama": "LLAMA", "qwen2": "QWEN2"}
TYPES = {"f32": "F32", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1"}
FILE_TYPES = {"f32": "ALL_F32", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0", "q4_1": "MOSTLY_Q4_1"}


def llama_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary layout: each head's rows reordered from (half, pair) to (pair, half)."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def read_state_dict(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise SystemExit(f"{folder} has no *.safetensors file; pass a save_pretrained folder")
    state: dict[str, np.ndarray] = {}
    for f in files:
        state.update(load_file(f))
    return state


def write(folder: Path, out: Path, qtype: str = "q8_0") -> Path:
    import gguf

    from lars_export import load

    config = json.loads((folder / "config.json").read_text())
    family = config.get("model_type")
    if family not in ARCHES:
        raise SystemExit(f"{folder}: model_type {family!r} is not one this tool writes ({', '.join(ARCHES)})")
    # transformers 5 writes rope settings as rope_parameters (theta inside), older versions rope_theta + rope_scaling
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope_theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise SystemExit(f"{folder}: rope scaling {rope} is not written by this tool (llama.cpp keeps it as a "
                         f"rope_freqs tensor that transformers' GGUF reader does not read); use a folder without it")
    arch = getattr(gguf.MODEL_ARCH, ARCHES[family])
    n_layer, n_head = config["num_hidden_layers"], config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads", n_head)
    names = gguf.get_tensor_name_map(arch, n_layer)

    writer = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(folder.name)
    writer.add_block_count(n_layer)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(rope_theta)
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[qtype]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokenizer = gguf.GGUFReader(str(load.default_gguf()))
    for key, field in tokenizer.fields.items():
        if key.startswith("tokenizer."):
            vtype = field.types[0]
            writer.add_key_value(key, field.contents(), vtype,
                                 sub_type=field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None)

    quant = getattr(gguf.GGMLQuantizationType, TYPES[qtype])
    state = read_state_dict(folder)
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    for hf_name, tensor in state.items():
        stem, suffix = hf_name.rsplit(".", 1)
        name = names.get_name(stem)
        if name is None:
            raise SystemExit(f"{folder}: tensor {hf_name} has no GGUF name for {family}")
        data = tensor.astype(np.float32)
        if family == "llama" and stem.endswith("self_attn.q_proj"):
            data = llama_permute(data, n_head)
        elif family == "llama" and stem.endswith("self_attn.k_proj"):
            data = llama_permute(data, n_kv)
        if data.ndim == 2 and quant != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(f"{name}.{suffix}", gguf.quants.quantize(data, quant), raw_dtype=quant)
        else:
            writer.add_tensor(f"{name}.{suffix}", data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="a save_pretrained folder (Llama or Qwen2)")
    parser.add_argument("out", type=Path, help="the .gguf file to write")
    parser.add_argument("--type", choices=sorted(TYPES), default="q8_0",
                        help="block type of the 2-D weights (default q8_0, as Qwen2.5's published q8_0 GGUFs)")
    args = parser.parse_args(argv)
    write(args.model, args.out, args.type)
    print(f"wrote {args.out} ({args.out.stat().st_size / 2**20:,.0f} MB, {args.type})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
