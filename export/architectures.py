"""The model families lars exports, the check that names an unsupported one, and the family-specific form a model
takes for export.

Llama, Qwen2 and Gemma 3 share the module names lars adapts (q/k/v/o_proj, gate/up/down_proj); what a family needs
beyond that is handled here.
"""

from __future__ import annotations

from lars_artifacts import LarsError

SUPPORTED = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",  # Gemma 3 1B and the text-only form of the larger ones
}
# Rope scalings whose frequencies depend on the sequence length at run time (a Python branch in transformers): the
# ONNX trace freezes them at the traced length, so the graph would drift from the model on long sequences.
LENGTH_DEPENDENT_ROPE = {"dynamic": "dynamic NTK", "longrope": "LongRoPE"}


def rope_types(config) -> set[str]:
    """Every rope_type a config uses (transformers keeps one rope dict, or one per layer type as Gemma 3 does)."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    dicts = [rope] if "rope_type" in rope or "type" in rope else [v for v in rope.values() if isinstance(v, dict)]
    return {d.get("rope_type") or d.get("type") or "default" for d in dicts}


def check_architecture(config) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        archs = ",".join(getattr(config, "architectures", None) or []) or "unknown class"
        raise LarsError(f"architecture {model_type!r} ({archs}) is not supported; lars exports "
                        f"{', '.join(SUPPORTED)} models (e.g. SmolLM2, Llama 3, Qwen2/2.5, Gemma 3 text)")
    # The attention passes skip the key blocks after each query (causal_attention): a bidirectional model
    # (EmbeddingGemma-style encoders set this) would train on the wrong attention.
    if getattr(config, "use_bidirectional_attention", False):
        raise LarsError(f"{model_type} config sets use_bidirectional_attention: lars trains causal decoders; "
                        f"export the causal (generative) form of this model")
    dynamic = sorted(LENGTH_DEPENDENT_ROPE[t] for t in rope_types(config) & set(LENGTH_DEPENDENT_ROPE))
    if dynamic:
        raise LarsError(f"{model_type} config uses {', '.join(dynamic)} rope scaling, whose frequencies change with "
                        f"the sequence length and cannot be exported to a fixed graph; use a checkpoint with "
                        f"static rope scaling (default, linear, llama3 or yarn)")


def sigmoid_tanh_gelu():
    """GELU's tanh approximation as x·σ(2u), u = √(2/π)(x + 0.044715x³): equal to 0.5x(1 + tanh u), since
    0.5(1 + tanh u) = σ(2u). Gemma's MLP uses the tanh form; ORT 1.19.2's gradient build fails on its exported graph
    (a fusion of it stops with "Argument mismatch when removing edge"), while Sigmoid has a gradient builder whose
    SigmoidGrad lowers to three standard ops (lowering/sigmoid_grad.py)."""
    import math

    import torch

    class SigmoidTanhGELU(torch.nn.Module):
        def forward(self, x):
            return x * torch.sigmoid(math.sqrt(8 / math.pi) * (x + 0.044715 * x * x * x))

    return SigmoidTanhGELU()


def prepare_for_export(model) -> int:
    """Swap modules the ONNX trace would turn into a graph ORT cannot differentiate for equal ones it can; returns
    how many were swapped."""
    from transformers.activations import GELUTanh

    swapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, GELUTanh):
                setattr(module, name, sigmoid_tanh_gelu())
                swapped += 1
    return swapped


def describe(config) -> dict:
    """The dims the runtime and the manifest need."""
    heads = config.num_attention_heads
    return {
        "model_type": config.model_type,
        "architecture": SUPPORTED[config.model_type],
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        "rms_norm_eps": config.rms_norm_eps,
    }
