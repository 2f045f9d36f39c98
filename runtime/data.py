"""Training data: files -> token sequences -> padded batches, with a resumable position.

Formats (mlx-lm's conventions):
- `.txt`: the whole file is one document;
- `.jsonl`, one JSON object per line, each line one of
  {"text": ...}                     documents, packed with EOS between them into blocks of seq_len tokens;
  {"prompt": ..., "completion": ...} one sequence each; the loss covers the completion only (mask_prompt);
  {"messages": [{"role", "content"}, ...]}  rendered with the bundle's chat template; the last assistant message is
                                    the completion;
  {"input_ids": [...]}              pre-tokenised, packed like text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from lars_artifacts import IGNORE_INDEX, LarsError


@dataclass
class Sequence:
    tokens: np.ndarray   # int64 [n]
    targets: np.ndarray  # bool [n]: token i is predicted (from tokens[:i]) and counts in the loss


@dataclass
class Batch:
    input_ids: np.ndarray       # int64 [b, t]
    attention_mask: np.ndarray  # int64 [b, t]
    labels: np.ndarray          # int64 [b, t]; IGNORE_INDEX where no loss

    @property
    def label_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())


class ChatTemplate:
    """Renders {"messages"} with the bundle's Jinja chat template, as transformers does (sandboxed Jinja)."""

    def __init__(self, source: str | None, bos_token: str | None, eos_token: str | None) -> None:
        self.source = source
        self.special = {"bos_token": bos_token or "", "eos_token": eos_token or ""}
        self._template = None

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        if not self.source:
            raise LarsError("the bundle has no chat template, so {\"messages\"} data cannot be rendered; "
                            "use {\"text\"} or {\"prompt\", \"completion\"} lines")
        if self._template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise LarsError(f"chat template: {message}")

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
            self._template = env.from_string(self.source)
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **self.special)


class Tokenizer:
    """The bundle's `tokenizers` tokenizer plus the ids the data pipeline needs."""

    def __init__(self, path: str, tokens: dict, chat_template: str | None, vocab_size: int) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self.tk = HFTokenizer.from_file(path)
        self.eos_id = tokens.get("eos_token_id")
        self.pad_id = tokens.get("pad_token_id")
        if self.pad_id is None:
            self.pad_id = self.eos_id if self.eos_id is not None else 0
        self.vocab_size = vocab_size
        self.chat = ChatTemplate(chat_template, tokens.get("bos_token"), tokens.get("eos_token"))

    def encode(self, text: str, special: bool = True) -> list[int]:
        return self.tk.encode(text, add_special_tokens=special).ids

    def decode(self, ids, skip_special: bool = False) -> str:
        return self.tk.decode(list(map(int, ids)), skip_special_tokens=skip_special)


def _check_ids(ids: np.ndarray, vocab_size: int, where: str) -> None:
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = int(ids.max()) if ids.max() >= vocab_size else int(ids.min())
        raise LarsError(f"{where}: token id {bad} is outside the model's vocabulary [0, {vocab_size}); "
                        f"tokenise with the bundle's tokenizer.json")


def _records(path: Path) -> Iterator[tuple[int, dict]]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise LarsError(f"{path} line {n}: not valid JSON ({e.msg}); each line must be one JSON object") \
                    from None
            if not isinstance(record, dict):
                raise LarsError(f"{path} line {n}: expected a JSON object with text, prompt+completion, messages "
                                f"or input_ids, got {type(record).__name__}")
            yield n, record


def _line_error(path: Path, n: int, record: dict) -> LarsError:
    return LarsError(f"{path} line {n}: keys {sorted(record)} are not a known format; use {{\"text\"}}, "
                     f"{{\"prompt\", \"completion\"}}, {{\"messages\"}} or {{\"input_ids\"}}")


def load_sequences(path: str | Path, tok: Tokenizer, seq_len: int, mask_prompt: bool = True) -> list[Sequence]:
    """Read a data file into sequences of at most seq_len + 1 tokens (inputs plus the last target)."""
    path = Path(path)
    if not path.is_file():
        raise LarsError(f"data file {path} does not exist; pass a .txt or .jsonl file")
    stream: list[int] = []  # documents packed with EOS between them
    pairs: list[Sequence] = []
    if path.suffix == ".jsonl":
        for n, record in _records(path):
            where = f"{path} line {n}"
            if "text" in record:
                if not isinstance(record["text"], str):
                    raise LarsError(f"{where}: \"text\" must be a string")
                stream += tok.encode(record["text"]) + ([tok.eos_id] if tok.eos_id is not None else [])
            elif "input_ids" in record:
                ids = np.asarray(record["input_ids"], dtype=np.int64)
                _check_ids(ids, tok.vocab_size, where)
                stream += ids.tolist()
            elif "prompt" in record and "completion" in record:
                if not isinstance(record["prompt"], str) or not isinstance(record["completion"], str):
                    raise LarsError(f"{where}: \"prompt\" and \"completion\" must be strings")
                pairs.append(_pair(tok, tok.encode(record["prompt"]), tok.encode(record["completion"], special=False)
                                   + ([tok.eos_id] if tok.eos_id is not None else []), mask_prompt))
            elif "messages" in record:
                pairs.append(_messages(tok, record["messages"], mask_prompt, where))
            else:
                raise _line_error(path, n, record)
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise LarsError(f"data file {path} is not UTF-8 text; pass a .txt (UTF-8) or .jsonl file") from None
        if text.strip():
            stream = tok.encode(text)
    out = []
    block = seq_len + 1
    for start in range(0, max(0, len(stream) - 1), seq_len):  # consecutive blocks overlap by one token
        chunk = np.asarray(stream[start:start + block], dtype=np.int64)
        if len(chunk) >= 2:
            out.append(Sequence(chunk, np.ones(len(chunk), dtype=bool)))
    for seq in pairs:
        if len(seq.tokens) > block:
            seq = Sequence(seq.tokens[:block], seq.targets[:block])
        if seq.targets[1:].any():
            out.append(seq)
    if not out:
        raise LarsError(f"data file {path} holds no trainable tokens; it is empty or every example is prompt only")
    for seq in out:
        _check_ids(seq.tokens, tok.vocab_size, str(path))
    return out


def _pair(tok: Tokenizer, prompt: list[int], completion: list[int], mask_prompt: bool) -> Sequence:
    tokens = np.asarray(prompt + completion, dtype=np.int64)
    targets = np.ones(len(tokens), dtype=bool)
    if mask_prompt:
        targets[:len(prompt)] = False
    return Sequence(tokens, targets)


def _messages(tok: Tokenizer, messages, mask_prompt: bool, where: str) -> Sequence:
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise LarsError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} objects")
    full = tok.chat.render(messages, add_generation_prompt=False)
    if messages[-1]["role"] == "assistant":
        prompt = tok.chat.render(messages[:-1], add_generation_prompt=True)
        if full.startswith(prompt):
            return _pair(tok, tok.encode(prompt), tok.encode(full[len(prompt):], special=False), mask_prompt)
    return _pair(tok, [], tok.encode(full), mask_prompt=False)


def collate(seqs: list[Sequence], pad_id: int) -> Batch:
    """Right-pad to the longest sequence; labels are the next token where it is a target, else IGNORE_INDEX."""
    t = max(len(s.tokens) for s in seqs) - 1
    ids = np.full((len(seqs), t), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), t), dtype=np.int64)
    labels = np.full((len(seqs), t), IGNORE_INDEX, dtype=np.int64)
    for i, s in enumerate(seqs):
        n = len(s.tokens) - 1
        ids[i, :n] = s.tokens[:-1]
        mask[i, :n] = 1
        labels[i, :n] = np.where(s.targets[1:], s.tokens[1:], IGNORE_INDEX)
    return Batch(ids, mask, labels)


class BatchStream:
    """Endless shuffled batches; the position (epoch, index) is the resume state.

    Each epoch's order is a permutation drawn from seed + epoch, so a resumed run sees exactly the batches the
    uninterrupted run would have seen.
    """

    def __init__(self, seqs: list[Sequence], batch_size: int, pad_id: int, seed: int,
                 epoch: int = 0, index: int = 0) -> None:
        self.seqs, self.batch_size, self.pad_id, self.seed = seqs, batch_size, pad_id, seed
        self.epoch, self.index = epoch, index

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.seqs))

    def next(self) -> Batch:
        picked = []
        while len(picked) < self.batch_size:
            order = self._order(self.epoch)
            take = order[self.index:self.index + self.batch_size - len(picked)]
            picked += [self.seqs[i] for i in take]
            self.index += len(take)
            if self.index >= len(order):
                self.epoch, self.index = self.epoch + 1, 0
        return collate(picked, self.pad_id)

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}


def eval_batches(seqs: list[Sequence], batch_size: int, pad_id: int, limit: int = 0) -> Iterator[Batch]:
    n = len(seqs) if not limit else min(len(seqs), limit * batch_size)
    for start in range(0, n, batch_size):
        yield collate(seqs[start:start + batch_size], pad_id)
