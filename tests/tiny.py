"""Tiny random models of each family lars exports, built from a config, with a BPE tokenizer trained on the repo's
excerpt: llama (tied head), llama3 (Llama 3.x rope scaling, untied head), qwen2 (untied), gemma3 (Gemma 3 text: a
sliding-window layer, q/k norms, tanh GELU, scaled embeddings, tied head)."""

from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).parent / "data"
TRAIN_TEXT = DATA / "hamlet_act1.txt"
EVAL_TEXT = DATA / "macbeth_act1_eval.txt"

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_tokenizer(out: Path, vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train([str(TRAIN_TEXT)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   bos_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.save_pretrained(out)
    return fast


def build_model(arch: str, out: Path, vocab_size: int = 384, seed: int = 0) -> Path:
    """Save a tiny random model + tokenizer to `out` (a local HF folder lars-export accepts)."""
    import torch
    from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
                  bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if arch == "llama":
        config, cls = LlamaConfig(**common, tie_word_embeddings=True), LlamaForCausalLM
    elif arch == "llama3":
        rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16}  # short: the head's frequencies fall in all three bands
        # of llama3 scaling (kept, smoothed, divided by the factor)
        config, cls = LlamaConfig(**common, tie_word_embeddings=False, rope_scaling=rope), LlamaForCausalLM
    elif arch == "qwen2":
        config, cls = Qwen2Config(**common, tie_word_embeddings=False), Qwen2ForCausalLM
    elif arch == "gemma3":
        # a window shorter than the test sequences, so the sliding layer's mask differs from the causal one
        config = Gemma3TextConfig(**common, head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
                                  layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=True)
        cls = Gemma3ForCausalLM
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = cls(config)
    with torch.no_grad():  # random-init norms are all ones: identical initializers get merged by the exporter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    build_tokenizer(out, vocab_size)
    return out


def random_lora_b(trainer, seed) -> dict:
    """The trainer's adapters with every LoRA B drawn from N(0, 0.05²) (PEFT's B = 0 makes every dA zero, which
    would hide errors in them), set on its engine and returned. `seed`: an int or a numpy Generator (drawn from)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    adapters = trainer.adapter_tensors()
    for name in adapters:
        if ".lora_B." in name:
            adapters[name] = rng.normal(0, 0.05, adapters[name].shape).astype(np.float32)
    trainer.engine.set_adapter_tensors(adapters)
    return adapters
