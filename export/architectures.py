"""The model families lars exports, and the check that names an unsupported one.

Llama and Qwen2 share the module names lars adapts (q/k/v/o_proj, gate/up/down_proj); a family that needs
specific handling gets its own entry here.
"""

from __future__ import annotations

from lars_artifacts import LarsError

SUPPORTED = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}


def check_architecture(config) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        archs = ",".join(getattr(config, "architectures", None) or []) or "unknown class"
        raise LarsError(f"architecture {model_type!r} ({archs}) is not supported; lars exports "
                        f"{', '.join(SUPPORTED)} models (e.g. SmolLM2, Llama 3, Qwen2/2.5)")


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
