"""Data formats, packing, masking, batching and the resumable data position."""

import json

import numpy as np
import pytest

from lars_artifacts import LarsError, load_bundle
from lars_ort.data import BatchStream, collate, load_sequences
from lars_ort.trainer import load_tokenizer
from tiny import TRAIN_TEXT


@pytest.fixture(scope="module")
def tok(tiny_bundles):
    return load_tokenizer(load_bundle(tiny_bundles["llama"]))


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
    from lars_ort.data import Sequence

    a = Sequence(np.array([5, 6, 7, 8]), np.ones(4, bool))
    b = Sequence(np.array([9, 10]), np.ones(2, bool))
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
