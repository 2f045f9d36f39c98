"""What the tests share (tests import helpers from here, never from each other).

Tiny random models of each family lars exports, built from a config, with a BPE tokenizer trained on the repo's
excerpt: llama (tied head), llama3 (Llama 3.x rope scaling, untied head), qwen2 (untied), gemma3 (Gemma 3 text: a
sliding-window layer, q/k norms, tanh GELU, scaled embeddings, tied head). The comparison of a bundle's first step
with PyTorch + PEFT's (compare_with_peft), and malformed data lines with what their errors must name (BAD_DATA)."""

from __future__ import annotations

import json
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


def reference_batch(trainer, vocab, seed=0):
    """A batch of 3 rows of 21 random tokens, two right-padded, the first row's first 4 labels without loss."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=(3, 21))
    mask = np.ones_like(ids)
    mask[1, 15:] = 0  # a right-padded row
    mask[2, 9:] = 0
    batch = trainer.batch(ids, mask)
    batch.labels[0, :4] = -100  # prompt-like positions without loss
    return batch


def peft_step(model_dir, bundle, adapters, batch, dequantize=None):
    """(loss, {onnx name: gradient}) of PyTorch + PEFT on the model folder with the bundle's adapters set to
    `adapters` (eager attention, float32)."""
    import torch
    from transformers import AutoModelForCausalLM

    from lars_export.adapters import peft_reference

    manifest = bundle.manifest
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    if dequantize:
        dequantize(model)
    peft_model = peft_reference(model, manifest, adapters)
    params = dict(peft_model.named_parameters())
    logits = peft_model(input_ids=torch.from_numpy(batch.input_ids),
                        attention_mask=torch.from_numpy(batch.attention_mask)).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             torch.from_numpy(batch.labels.reshape(-1)), ignore_index=-100)
    loss.backward()
    grads = {p["onnx_name"]: params[p["onnx_name"].removeprefix("model.")].grad.numpy()
             for p in manifest.adapter["parameters"]}
    return float(loss.detach()), grads


def compare_with_peft(model_dir, bundle_dir, dequantize=None):
    """First-step loss and every LoRA gradient of the bundle against PyTorch + PEFT (B randomised in both);
    `dequantize(model)` gives the reference the bundle's quantized frozen weights."""
    import numpy as np
    import pytest

    from lars_artifacts import load_bundle
    from lars_ort import Trainer

    bundle = load_bundle(bundle_dir)
    trainer = Trainer(bundle, load_eval=False)
    adapters = random_lora_b(trainer, 1)  # B = 0 (PEFT's init) makes every dA zero
    batch = reference_batch(trainer, bundle.manifest.vocab_size)

    ours = trainer.engine.forward_backward(batch)
    grads = trainer.engine.gradients()
    ref_loss, ref_grads = peft_step(model_dir, bundle, adapters, batch, dequantize)

    assert ours == pytest.approx(ref_loss, rel=1e-5)
    assert len(grads) == len(ref_grads) == 2 * 7 * 2  # layers x targets x (A, B)
    for name, ref in ref_grads.items():
        assert np.abs(ref).max() > 0, name
        np.testing.assert_allclose(grads[name], ref, rtol=1e-3, atol=1e-5 * np.abs(ref).max(), err_msg=name)


# -- malformed data lines (test_data, test_fuzz_data) ------------------------------------------------------------------
OK_LINE = '{"text": "Who\'s there?"}\n'


def chat(*messages):
    return json.dumps({"messages": list(messages)})


BAD_DATA = [  # file name, content, what the error names
    ("utf8.jsonl", OK_LINE.encode() + b'{"text": "caf\xe9"}\n',
     ["utf8.jsonl line 2", "not UTF-8", "save the file as UTF-8"]),
    ("utf8.txt", b"fine\nalso fine\n\xff\xfe\n", ["utf8.txt line 3", "not UTF-8", "save the file as UTF-8"]),
    ("nan.jsonl", OK_LINE + '{"input_ids": [1, NaN]}', ["nan.jsonl line 2", "item 1 is NaN", "integer token ids"]),
    ("null.jsonl", OK_LINE + '{"input_ids": [1, null]}', ["line 2", "item 1 is null", "integer token ids"]),
    ("float.jsonl", OK_LINE + '{"input_ids": [1, 1.5]}', ["line 2", "item 1 is 1.5", "integer token ids"]),
    ("bool.jsonl", OK_LINE + '{"input_ids": [true, 2]}', ["line 2", "item 0 is true", "integer token ids"]),
    ("string.jsonl", OK_LINE + '{"input_ids": ["5"]}', ["line 2", 'item 0 is "5"', "integer token ids"]),
    ("nested.jsonl", OK_LINE + '{"input_ids": [[1, 2], [3, 4]]}', ["line 2", "item 0 is a list", "flat list"]),
    ("ragged.jsonl", OK_LINE + '{"input_ids": [1, [2, 3]]}', ["line 2", "item 1 is a list", "flat list"]),
    ("huge.jsonl", OK_LINE + '{"input_ids": [1, 99999999999999999999999]}',
     ["line 2", "token id 99999999999999999999999", "vocabulary", "tokenise with the bundle's tokenizer.json"]),
    ("negative.jsonl", OK_LINE + '{"input_ids": [-1]}', ["line 2", "token id -1", "vocabulary"]),
    ("empty_ids.jsonl", OK_LINE + '{"input_ids": []}', ["line 2", '"input_ids" is empty', "drop the line"]),
    ("ids_text.jsonl", OK_LINE + '{"input_ids": "1 2 3"}', ["line 2", '"input_ids" is "1 2 3"', "flat list"]),
    ("digits.jsonl", OK_LINE + '{"input_ids": [' + "9" * 5000 + "]}",
     ["line 2", "not valid JSON (a number too long to read)", "one JSON object"]),
    ("content_int.jsonl", OK_LINE + chat({"role": "user", "content": 5}),
     ["line 2", 'message 1 "content" is 5, not a string', "write it as a JSON string"]),
    ("content_null.jsonl", OK_LINE + chat({"role": "user", "content": "hi"}, {"role": "assistant", "content": None}),
     ["line 2", 'message 2 "content" is null, not a string']),
    ("content_list.jsonl", OK_LINE + chat({"role": "user", "content": [{"type": "text", "text": "hi"}]}),
     ["line 2", 'message 1 "content" is a list, not a string']),
    ("no_role.jsonl", OK_LINE + chat({"content": "hi"}), ["line 2", 'message 1 has no "role"', "non-empty list"]),
    ("role_int.jsonl", OK_LINE + chat({"role": 1, "content": "hi"}), ["line 2", 'message 1 "role" is 1, not a string']),
    ("messages_text.jsonl", OK_LINE + '{"messages": "hi"}', ["line 2", '"messages" is "hi"', "non-empty list"]),
    ("messages_empty.jsonl", OK_LINE + '{"messages": []}', ["line 2", '"messages" is empty', "non-empty list"]),
    ("message_text.jsonl", OK_LINE + '{"messages": ["hi"]}', ["line 2", 'message 1 is "hi"', "non-empty list"]),
    ("text_int.jsonl", OK_LINE + '{"text": 5}', ["line 2", '"text" is 5, not a string', "JSON string"]),
    ("prompt_list.jsonl", OK_LINE + '{"prompt": ["a"], "completion": "b"}', ["line 2", '"prompt" is a list']),
    ("completion_null.jsonl", OK_LINE + '{"prompt": "a", "completion": null}', ["line 2", '"completion" is null']),
    ("surrogate.jsonl", OK_LINE + '{"text": "a\\ud800b"}', ["line 2", "unpaired surrogate \\ud800", "remove it"]),
    ("deep.jsonl", OK_LINE + "[" * 100_000 + "]" * 100_000, ["deep.jsonl line 2", "nested too deeply",
                                                                "one JSON object"]),
    ("deep_field.jsonl", OK_LINE + '{"text": ' + "[" * 100_000 + "]" * 100_000 + "}",
     ["line 2", "nested too deeply"]),
    ("data.json", '[{"text": "hi"}]', ["data.json is .json", "convert it to .jsonl", "one JSON object per line"]),
    ("data.csv", "text\nhello\n", ["data.csv has the extension .csv", "pass a .txt", ".jsonl"]),
    ("data.parquet", b"PAR1\x00\x00", ["data.parquet has the extension .parquet", "pass a .txt"]),
    ("data", "hello\n", ["has no extension", "pass a .txt"]),
]
