"""Data formats, packing, masking, batching and the resumable data position."""

import json
import os

import numpy as np
import pytest

import lars_ort.data as data_module
from lars_artifacts import TOKENIZER, LarsError, SpecialTokens, load_bundle
from lars_ort.data import BatchStream, TokenSequence, SequenceSet, Tokenizer, collate, eval_batches, load_sequences
from lars_ort.trainer import bundle_tokenizer
from tiny import BAD_DATA, EVAL_TEXT, OK_LINE, TRAIN_TEXT, chat


@pytest.fixture(scope="module")
def tok(tiny_bundles):
    return bundle_tokenizer(load_bundle(tiny_bundles["llama"]))


def test_text_is_packed_into_overlapping_blocks(tok):
    seqs = load_sequences(TRAIN_TEXT, tok, seq_len=32)
    stream = tok.encode(TRAIN_TEXT.read_text())
    assert all(len(s.tokens) == 33 for s in seqs[:-1])
    assert seqs[0].tokens.tolist() == stream[:33] and seqs[1].tokens.tolist() == stream[32:65]
    assert sum(len(s.tokens) - 1 for s in seqs) == len(stream) - 1  # every next-token target exactly once


def test_jsonl_text_documents_are_separated_by_eos(tok, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in ["Who's there?", "Nay, answer me"]) + "\n")
    (seq,) = load_sequences(data, tok, seq_len=64)
    expected = tok.encode("Who's there?") + [tok.eos_id] + tok.encode("Nay, answer me") + [tok.eos_id]
    assert seq.tokens.tolist() == expected


def test_prompt_completion_trains_on_completion_only(tok, tmp_path):
    data = tmp_path / "pc.jsonl"
    data.write_text(json.dumps({"prompt": "Q: who is there?\nA:", "completion": " Bernardo."}) + "\n")
    (seq,) = load_sequences(data, tok, seq_len=64)
    n_prompt = len(tok.encode("Q: who is there?\nA:"))
    batch = collate([seq], tok.pad_id)
    labelled = batch.labels[0] != -100
    assert not labelled[: n_prompt - 1].any() and labelled[n_prompt - 1:].all()
    assert tok.decode(batch.labels[0][labelled]) == " Bernardo.<|endoftext|>"
    (unmasked,) = load_sequences(data, tok, seq_len=64, mask_prompt=False)
    assert unmasked.targets.all()


def test_messages_use_the_chat_template_and_mask_all_but_the_last_answer(tok, tmp_path):
    data = tmp_path / "chat.jsonl"
    messages = [{"role": "user", "content": "Who's there?"}, {"role": "assistant", "content": "Nay, answer me."}]
    data.write_text(json.dumps({"messages": messages}) + "\n")
    (seq,) = load_sequences(data, tok, seq_len=128)
    assert tok.decode(seq.tokens) == ("<|im_start|>user\nWho's there?<|im_end|>\n<|im_start|>assistant\n"
                                      "Nay, answer me.<|im_end|>\n")
    assert tok.decode(seq.tokens[seq.targets]) == "Nay, answer me.<|im_end|>\n"


def test_collate_pads_right_with_mask_and_ignored_labels(tok):
    a = TokenSequence(np.array([5, 6, 7, 8]), np.ones(4, bool))
    b = TokenSequence(np.array([9, 10]), np.ones(2, bool))
    batch = collate([a, b], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7], [9, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch.labels.tolist() == [[6, 7, 8], [10, -100, -100]]


def test_batch_stream_resumes_at_its_position(tok):
    seqs = load_sequences(TRAIN_TEXT, tok, seq_len=16)
    one = BatchStream(seqs, 3, tok.pad_id, seed=7)
    first = [one.next() for _ in range(5)]
    state = one.state()
    rest = [one.next().input_ids for _ in range(len(seqs))]  # crosses an epoch boundary
    two = BatchStream(seqs, 3, tok.pad_id, seed=7, epoch=state["epoch"], index=state["index"])
    assert all((two.next().input_ids == r).all() for r in rest)
    assert not all((f.input_ids == BatchStream(seqs, 3, tok.pad_id, seed=8).next().input_ids).all() for f in first[:1])


def test_non_utf8_text_is_refused(tok, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(LarsError, match="not UTF-8"):
        load_sequences(bad, tok, seq_len=16)


# -- streaming loader: same sequences as the in-memory one -----------------------------------------------------------
def reference_sequences(path, tok, seq_len, mask_prompt=True):
    """The loader before streaming (the whole file in Python lists), kept as the reference for the packing:
    blocks of seq_len + 1 tokens overlapping by one, then the examples cut to seq_len + 1, those without a target
    dropped."""
    eos = [tok.eos_id]
    stream, examples = [], []
    if path.suffix == ".jsonl":
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            record = json.loads(line)
            if "text" in record:
                stream += tok.encode(record["text"]) + eos
            elif "input_ids" in record:
                stream += record["input_ids"]
            elif "prompt" in record:
                prompt = tok.encode(record["prompt"])
                examples.append((prompt + tok.encode(record["completion"], special=False) + eos,
                                 len(prompt) if mask_prompt else 0))
            else:
                messages = record["messages"]
                full = tok.chat.render(messages, add_generation_prompt=False)
                prompt = tok.chat.render(messages[:-1], add_generation_prompt=True)
                if messages[-1]["role"] == "assistant" and full.startswith(prompt):
                    ids = tok.encode(prompt)
                    examples.append((ids + tok.encode(full[len(prompt):], special=False),
                                     len(ids) if mask_prompt else 0))
                else:
                    examples.append((tok.encode(full), 0))
    else:
        text = path.read_text(encoding="utf-8")
        if text.strip():
            stream = tok.encode(text)
    out = []
    for start in range(0, max(0, len(stream) - 1), seq_len):
        chunk = np.asarray(stream[start:start + seq_len + 1], dtype=np.int64)
        out.append(TokenSequence(chunk, np.ones(len(chunk), dtype=bool)))
    for tokens, masked in examples:
        tokens = np.asarray(tokens[:seq_len + 1], dtype=np.int64)
        targets = np.ones(len(tokens), dtype=bool)
        targets[:masked] = False
        if targets[1:].any():
            out.append(TokenSequence(tokens, targets))
    return out


def assert_same_sequences(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.tokens.dtype == np.int64 and a.targets.dtype == bool
        assert a.tokens.tolist() == b.tokens.tolist() and a.targets.tolist() == b.targets.tolist()


def mixed_jsonl(path, tok):
    """Every .jsonl format, with examples that fit, that are cut (long completion) and that are dropped (a prompt
    filling the block)."""
    lines = [x for x in TRAIN_TEXT.read_text().splitlines() if x.strip()]
    long_text = " ".join(lines[:60])
    records = [{"text": lines[0]}, {"input_ids": tok.encode(lines[1])},
               {"prompt": lines[2], "completion": lines[3]},
               {"prompt": lines[4], "completion": long_text},                          # cut
               {"prompt": long_text, "completion": lines[5]},                          # dropped
               {"messages": [{"role": "user", "content": lines[4]}, {"role": "assistant", "content": lines[3]}]},
               {"messages": [{"role": "user", "content": long_text},                   # dropped (masked)
                             {"role": "assistant", "content": lines[8]}]},
               {"messages": [{"role": "user", "content": lines[9]}]},                  # no answer: all targets
               {"text": long_text}, {"text": ""}]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    return path


@pytest.mark.parametrize("seq_len", [8, 32, 200])
def test_streaming_loader_equals_the_in_memory_reference(tok, tmp_path, seq_len):
    for path in (TRAIN_TEXT, EVAL_TEXT, mixed_jsonl(tmp_path / "mixed.jsonl", tok)):
        for mask_prompt in (True, False):
            assert_same_sequences(load_sequences(path, tok, seq_len, mask_prompt),
                                  reference_sequences(path, tok, seq_len, mask_prompt))


def test_batches_are_those_of_the_in_memory_list(tok, tmp_path):
    data = mixed_jsonl(tmp_path / "mixed.jsonl", tok)
    streamed, reference = load_sequences(data, tok, 16), reference_sequences(data, tok, 16)
    a, b = BatchStream(streamed, 3, tok.pad_id, seed=5), BatchStream(reference, 3, tok.pad_id, seed=5)
    for _ in range(2 * len(reference)):
        x, y = a.next(), b.next()
        assert (x.input_ids == y.input_ids).all() and (x.labels == y.labels).all()
        assert (x.attention_mask == y.attention_mask).all()
    for x, y in zip(eval_batches(streamed, 4, tok.pad_id), eval_batches(reference, 4, tok.pad_id), strict=True):
        assert (x.input_ids == y.input_ids).all() and (x.labels == y.labels).all()


def test_sequence_set_reads_like_a_list(tok):
    seqs = load_sequences(TRAIN_TEXT, tok, seq_len=32)
    assert isinstance(seqs, SequenceSet) and seqs.tokens == len(tok.encode(TRAIN_TEXT.read_text()))
    assert seqs[-1].tokens.tolist() == seqs[len(seqs) - 1].tokens.tolist()
    assert [s.tokens.tolist() for s in seqs[2:5]] == [seqs[i].tokens.tolist() for i in (2, 3, 4)]
    assert seqs[np.int64(1)].tokens.tolist() == seqs[1].tokens.tolist()
    assert len(list(seqs)) == len(seqs)
    with pytest.raises(IndexError):
        seqs[len(seqs)]
    with seqs:
        pass
    with pytest.raises(ValueError):  # closed: its temporary files are gone
        seqs[0]


def test_truncated_and_dropped_examples_are_counted(tok, tmp_path):
    seqs = load_sequences(mixed_jsonl(tmp_path / "mixed.jsonl", tok), tok, seq_len=32)
    assert (seqs.truncated, seqs.dropped) == (1, 2)
    unmasked = load_sequences(tmp_path / "mixed.jsonl", tok, seq_len=32, mask_prompt=False)
    assert (unmasked.truncated, unmasked.dropped) == (3, 0)  # the long prompts are cut and kept


def test_only_dropped_examples_say_why(tok, tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "word " * 50, "completion": "x"}) + "\n")
    with pytest.raises(LarsError, match=r"prompts.jsonl holds no trainable tokens: 1 examples .*raise --seq-len"):
        load_sequences(data, tok, seq_len=16)


def test_text_is_tokenized_in_pieces_with_the_ids_of_the_whole_text(tok, monkeypatch):
    """Bounded memory: no encode call sees more than about a piece, and the cuts change no token (the tiny BPE
    uses GPT-2's byte-level pre-tokenizer, the case _safe_cut argues is always safe)."""
    monkeypatch.setattr(data_module, "TEXT_PIECE_CHARS", 1000)
    calls = []
    real = tok.encode
    monkeypatch.setattr(tok, "encode", lambda text, special=True: calls.append(len(text)) or real(text, special))
    seqs = load_sequences(TRAIN_TEXT, tok, seq_len=32)
    monkeypatch.undo()
    assert max(calls) < 2 * 1000 + 200 and len(calls) > len(TRAIN_TEXT.read_text()) // 1000
    assert_same_sequences(seqs, reference_sequences(TRAIN_TEXT, tok, 32))


# Qwen2's pre-tokenizer pattern (Llama 3's groups digits by three): punctuation keeps the line breaks after it.
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
                r"\s+(?!\S)|\s+")


def styled_tokenizer(path, style):
    """A BPE tokenizer trained on the excerpt with another pre-tokenizer or post-processor than the tiny model's."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, models, pre_tokenizers, processors, trainers

    tk = HFTokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=style != "qwen")
    tk.pre_tokenizer = {"qwen": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN_PATTERN), "isolated"),
                                                         byte_level]),
                        "sentencepiece": pre_tokenizers.Metaspace(),  # "▁" before the text of each call
                        "bos-eos": byte_level}[style]
    tk.train([str(TRAIN_TEXT)], trainers.BpeTrainer(vocab_size=384, special_tokens=["<s>", "</s>"],
                                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if style == "bos-eos":
        tk.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0),
                                                                                                ("</s>", 1)])
    tk.save(str(path))
    return Tokenizer(str(path), SpecialTokens(eos_token_id=1), None, tk.get_vocab_size())


@pytest.mark.parametrize("style, cut", [("qwen", True), ("bos-eos", True), ("sentencepiece", False)])
def test_text_pieces_keep_the_ids_of_the_whole_text_for_other_tokenizers(tmp_path, monkeypatch, style, cut):
    """Each cut is checked, the post-processor's BOS / EOS wrap the whole file once, and a tokenizer that prefixes
    each call ("▁") gets the file in one piece."""
    tok = styled_tokenizer(tmp_path / "tokenizer.json", style)
    monkeypatch.setattr(data_module, "TEXT_PIECE_CHARS", 1000)
    pieces = list(data_module._text_pieces(TRAIN_TEXT, tok, cut=True))
    assert "".join(pieces) == TRAIN_TEXT.read_text() and (len(pieces) > 10) == cut
    assert_same_sequences(load_sequences(TRAIN_TEXT, tok, 32), reference_sequences(TRAIN_TEXT, tok, 32))


def test_truncation_saved_in_tokenizer_json_is_ignored(tok, tiny_bundles, tmp_path):
    config = json.loads((tiny_bundles["llama"] / TOKENIZER).read_text())
    config["truncation"] = {"direction": "Right", "max_length": 8, "strategy": "LongestFirst", "stride": 0}
    (tmp_path / TOKENIZER).write_text(json.dumps(config))
    truncating = Tokenizer(str(tmp_path / TOKENIZER), SpecialTokens(eos_token_id=tok.eos_id), None, tok.vocab_size)
    assert_same_sequences(load_sequences(TRAIN_TEXT, truncating, 32), reference_sequences(TRAIN_TEXT, tok, 32))


def test_crlf_and_byte_order_mark_read_as_text_mode_reads_them(tok, tmp_path):
    """"\r\n" and "\r" are line breaks "\n" (as Python's text mode reads them); a UTF-8 byte-order mark is not
    text."""
    text = TRAIN_TEXT.read_text()[:5000] + "\rlast\r"
    windows, plain = tmp_path / "windows.txt", tmp_path / "plain.txt"
    windows.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    plain.write_text(text.replace("\r", "\n"))
    assert_same_sequences(load_sequences(windows, tok, 32), reference_sequences(plain, tok, 32))
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + OK_LINE.encode())
    assert load_sequences(bom, tok, 32)[0].tokens.tolist() == tok.encode("Who's there?") + [tok.eos_id]


# -- every bad value is a one-line error naming the file, the line and the fix -------------------------------------


@pytest.mark.parametrize("name, content, needles", BAD_DATA, ids=[case[0] for case in BAD_DATA])
def test_bad_data_is_a_one_line_error_naming_line_and_fix(tok, tmp_path, name, content, needles):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(LarsError) as error:
        load_sequences(path, tok, seq_len=16)
    message = str(error.value)
    assert "\n" not in message and str(path) in message
    for needle in needles:
        assert needle in message, message


def test_extensions_are_matched_in_any_case(tok, tmp_path):
    upper_txt, upper_jsonl = tmp_path / "HAMLET.TXT", tmp_path / "MIXED.JSONL"
    upper_txt.write_bytes(TRAIN_TEXT.read_bytes())
    mixed = mixed_jsonl(tmp_path / "mixed.jsonl", tok)
    upper_jsonl.write_bytes(mixed.read_bytes())
    assert_same_sequences(load_sequences(upper_txt, tok, 32), reference_sequences(TRAIN_TEXT, tok, 32))
    assert_same_sequences(load_sequences(upper_jsonl, tok, 32), reference_sequences(mixed, tok, 32))


def test_directory_and_unreadable_data_are_refused(tok, tmp_path, monkeypatch):
    with pytest.raises(LarsError, match="is a directory; pass a .txt"):
        load_sequences(tmp_path, tok, seq_len=16)
    data = tmp_path / "locked.txt"
    data.write_text("hello\n")

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(data_module, "open", refuse, raising=False)  # root reads a chmod 000 file regardless
    with pytest.raises(LarsError, match=r"cannot read data file .*locked.txt \(Permission denied\); check"):
        load_sequences(data, tok, seq_len=16)


@pytest.mark.parametrize("garbage", [b"\x00\xffnot json", b'{"version": 1}', b""])
def test_garbage_tokenizer_json_says_to_reexport_the_bundle(tmp_path, garbage):
    path = tmp_path / TOKENIZER
    path.write_bytes(garbage)
    with pytest.raises(LarsError) as error:
        Tokenizer(str(path), SpecialTokens(), None, 384)
    assert str(path) in str(error.value) and "re-export the bundle" in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("template, needle", [
    ("{{ messages[0].nope.deeper }}", "UndefinedError"),
    ("{% for m in messages %}{{ m['content'] }}", "TemplateSyntaxError"),
    ("{{ raise_exception('Conversation roles must alternate') }}", "refuses these messages: Conversation roles"),
    ("{{ messages[0]['content'] + 1 }}", "TypeError"),
])
def test_chat_template_failures_name_the_line(tok, tiny_bundles, tmp_path, template, needle):
    bundle = load_bundle(tiny_bundles["llama"])
    broken = Tokenizer(bundle.file(TOKENIZER), bundle.manifest.special_tokens, template, bundle.manifest.vocab_size)
    data = tmp_path / "chat.jsonl"
    data.write_text(OK_LINE + chat({"role": "user", "content": "hi"}, {"role": "assistant", "content": "ho"}) + "\n")
    with pytest.raises(LarsError) as error:
        load_sequences(data, broken, seq_len=16)
    message = str(error.value)
    assert "chat.jsonl line 2" in message and needle in message and "fix the example" in message, message
    assert "\n" not in message


def test_messages_without_a_chat_template_name_the_line(tiny_bundles, tmp_path):
    bundle = load_bundle(tiny_bundles["llama"])
    plain = Tokenizer(bundle.file(TOKENIZER), bundle.manifest.special_tokens, None, bundle.manifest.vocab_size)
    data = tmp_path / "chat.jsonl"
    data.write_text(chat({"role": "user", "content": "hi"}) + "\n")
    with pytest.raises(LarsError, match=r"chat.jsonl line 1: the bundle has no chat template.*use \{\"text\"\}"):
        load_sequences(data, plain, seq_len=16)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="lists open files through /proc (Linux)")
def test_token_store_lives_in_the_given_directory_and_leaves_nothing(tok, tmp_path):
    """`lars-ort train` puts the store in the run directory: /tmp is RAM (tmpfs) on many systems."""
    def store_files():
        links = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                 if os.path.exists(f"/proc/self/fd/{fd}")]
        return [x for x in links if x.startswith(str(tmp_path))]

    data = load_sequences(TRAIN_TEXT, tok, 32, store_dir=tmp_path)
    assert len(store_files()) == 3 and len(data) > 10
    assert list(tmp_path.iterdir()) == []  # unnamed files: nothing to clean up after a crash
    data.close()
    assert store_files() == []
