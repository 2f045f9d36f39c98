"""Training data: files -> token sequences -> padded batches, with a resumable position.

Formats (mlx-lm's conventions), told apart by the file's extension in any case:
- `.txt`: UTF-8 text, the whole file one document;
- `.jsonl`, one JSON object per line, each line one of
  {"text": ...}                     documents, packed with EOS between them into blocks of seq_len tokens;
  {"prompt": ..., "completion": ...} one sequence each; the loss covers the completion only (mask_prompt);
  {"messages": [{"role", "content"}, ...]}  rendered with the bundle's chat template; the last assistant message is
                                    the completion;
  {"input_ids": [...]}              pre-tokenised, packed like text.
Other extensions are refused rather than read as text; `.json` (one value holding every example) with a hint to
convert it to `.jsonl`.

Memory is bounded by the batch, not the file: the loader tokenizes one line (.jsonl) or one piece of about
TEXT_PIECE_CHARS characters (.txt) at a time and appends the ids to anonymous temporary files (4 bytes a token, in
TMPDIR), and `ds[i]` reads one sequence back. Every value is checked on the way: a bad one is a one-line LarsError
naming the file, the line and the fix.
"""

from __future__ import annotations

import json
import operator
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from lars_artifacts import IGNORE_INDEX, LarsError, SpecialTokens

DATA_FORMATS = ".txt (UTF-8 text) or .jsonl (one JSON object per line)"
# Characters of a .txt file tokenized at once. The tokenizer's Encoding costs ~450 bytes a token while it lives
# (offsets, token strings), so a 64K-character piece (~20k tokens) costs ~10 MB, where a whole 50 MB file cost 7 GB.
TEXT_PIECE_CHARS = 1 << 16
CUT_CHECK_CHARS = 256  # text either side of a candidate cut that is tokenized whole and in two (_safe_cut)
CUT_TRIES = 8          # candidate cuts checked per piece before waiting for more text


@dataclass
class TokenSequence:
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


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


class ChatTemplate:
    """Renders {"messages"} with the bundle's Jinja chat template, as transformers does (sandboxed Jinja)."""

    def __init__(self, source: str | None, bos_token: str | None, eos_token: str | None) -> None:
        self.source = source
        self.special = {"bos_token": bos_token or "", "eos_token": eos_token or ""}
        self._template = None

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """The rendered text; any failure of the template (syntax, undefined values, raise_exception) is a
        LarsError."""
        if not self.source:
            raise LarsError("the bundle has no chat template, so {\"messages\"} data cannot be rendered; "
                            "use {\"text\"} or {\"prompt\", \"completion\"} lines")
        try:
            if self._template is None:
                from jinja2.sandbox import ImmutableSandboxedEnvironment

                def raise_exception(message):
                    raise LarsError(f"the chat template refuses these messages: {message}; fix the example")

                env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
                env.globals["raise_exception"] = raise_exception
                env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
                self._template = env.from_string(self.source)
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self.special)
        except LarsError:
            raise
        except Exception as e:  # jinja2's TemplateError family, and whatever the template's Python calls raise
            raise LarsError(f"the bundle's chat template failed ({type(e).__name__}: {_one_line(e)}); fix the "
                            f"example's messages, or chat_template in the bundle's tokenizer_config.json") from None


class Tokenizer:
    """The bundle's `tokenizers` tokenizer plus the ids the data pipeline needs."""

    def __init__(self, path: str, tokens: SpecialTokens, chat_template: str | None, vocab_size: int) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self.tk = HFTokenizer.from_file(str(path))
        except Exception as e:  # `tokenizers` raises a bare Exception for an unreadable or malformed file
            raise LarsError(f"{path}: not a tokenizer this runtime can read ({_one_line(e)}); re-export the "
                            f"bundle with lars-export") from None
        # Truncation or padding saved in tokenizer.json would cut a document at its max_length or pad it: the
        # data pipeline cuts and pads sequences itself.
        self.tk.no_truncation()
        self.tk.no_padding()
        self.eos_id = tokens.eos_token_id
        self.pad_id = tokens.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.eos_id if self.eos_id is not None else 0
        self.vocab_size = vocab_size
        self.chat = ChatTemplate(chat_template, tokens.bos_token, tokens.eos_token)

    def encode(self, text: str, special: bool = True) -> list[int]:
        return self.tk.encode(text, add_special_tokens=special).ids

    def decode(self, ids, skip_special: bool = False) -> str:
        return self.tk.decode(list(map(int, ids)), skip_special_tokens=skip_special)


# -- the token store -------------------------------------------------------------------------------------------------
class _IntFile:
    """An append-only integer array in an anonymous temporary file, which the OS deletes when it is closed or the
    process ends. Appends are buffered writes and reads are seek + read (appends only while loading): neither maps
    the file, whose touched pages would count in the process's resident memory."""

    def __init__(self, dtype, directory: str | Path | None = None) -> None:
        self.dtype = np.dtype(dtype)
        self.size = 0
        self.directory = directory
        try:
            self.file = tempfile.TemporaryFile(prefix="lars-data-", dir=directory)
        except OSError as e:
            raise _store_error(e, directory) from None

    def append(self, values) -> None:
        array = np.asarray(values, dtype=self.dtype)
        try:
            self.file.write(array.tobytes())
        except OSError as e:
            raise _store_error(e, self.directory) from None
        self.size += array.size

    def read(self, start: int, count: int) -> np.ndarray:
        self.file.seek(start * self.dtype.itemsize)
        return np.frombuffer(self.file.read(count * self.dtype.itemsize), dtype=self.dtype)

    def clear(self) -> None:
        self.file.seek(0)
        self.file.truncate()
        self.size = 0


def _store_error(e: OSError, directory: str | Path | None) -> LarsError:
    where = directory or tempfile.gettempdir()
    return LarsError(f"cannot store the tokenized data in {where} ({e.strerror or e}); free space there (4 bytes a "
                     f"token)" + ("" if directory else " or set TMPDIR to a directory with room"))


def _close_files(*files) -> None:
    for f in files:
        f.close()


class SequenceSet:
    """A data file's training sequences, held in temporary files (4 bytes a token) rather than in memory.

    Reads like the list of TokenSequence it replaces: len(ds), ds[i], ds[a:b], iteration; the order is the packed
    blocks of the text stream, then the {"prompt", "completion"} and {"messages"} examples in file order.
    Packed text is cut into blocks of seq_len + 1 tokens overlapping by one (every next-token target once).

    Attributes:
        truncated: examples ({"prompt", "completion"} or {"messages"}) longer than seq_len + 1 tokens that were
                   cut to their first seq_len + 1 tokens and kept.
        dropped:   examples left out because no target token remained in their first seq_len + 1 tokens (the
                   prompt alone fills them, or the example has no completion). A cut and dropped example counts
                   here only.
        tokens:    tokens held (the packed stream plus the kept examples).

    close() (or the garbage collector, or the process ending) deletes the files. Reads seek a shared file: one
    reader at a time.
    """

    def __init__(self, seq_len: int, store_dir: str | Path | None = None) -> None:
        self.seq_len = seq_len
        self.truncated = 0
        self.dropped = 0
        self._stream = _IntFile(np.int32, store_dir)           # documents packed with EOS between them
        self._example_tokens = _IntFile(np.int32, store_dir)
        self._examples = _IntFile(np.int64, store_dir)         # (start in _example_tokens, length, masked prompt)
        self._close = weakref.finalize(self, _close_files, self._stream.file, self._example_tokens.file,
                                       self._examples.file)

    # -- loading --
    def pack(self, ids) -> None:
        """Append a document (token ids) to the packed text stream."""
        self._stream.append(ids)

    def add_example(self, tokens: list[int], masked: int) -> None:
        """An example whose first `masked` tokens are not targets: cut to seq_len + 1 tokens, dropped if no target
        token remains (a target is predicted from the tokens before it, so token 0 never is one)."""
        block = self.seq_len + 1
        cut = len(tokens) > block
        tokens = tokens[:block]
        if max(masked, 1) >= len(tokens):
            self.dropped += 1
            return
        self.truncated += cut
        self._examples.append([self._example_tokens.size, len(tokens), min(masked, len(tokens))])
        self._example_tokens.append(tokens)

    def clear_stream(self) -> None:
        self._stream.clear()

    # -- reading --
    @property
    def tokens(self) -> int:
        return self._stream.size + self._example_tokens.size

    @property
    def _blocks(self) -> int:
        return -(-max(0, self._stream.size - 1) // self.seq_len)  # blocks start every seq_len tokens

    def __len__(self) -> int:
        return self._blocks + self._examples.size // 3

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = operator.index(i)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sequence {i} of {n}")
        blocks = self._blocks
        if i < blocks:
            start = i * self.seq_len
            tokens = self._stream.read(start, min(self.seq_len + 1, self._stream.size - start)).astype(np.int64)
            return TokenSequence(tokens, np.ones(len(tokens), dtype=bool))
        start, length, masked = (int(v) for v in self._examples.read(3 * (i - blocks), 3))
        tokens = self._example_tokens.read(start, length).astype(np.int64)
        targets = np.ones(length, dtype=bool)
        targets[:masked] = False
        return TokenSequence(tokens, targets)

    def __iter__(self) -> Iterator[TokenSequence]:
        for i in range(len(self)):
            yield self[i]

    def close(self) -> None:
        self._close()

    def __enter__(self) -> SequenceSet:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


Sequences = SequenceSet | list[TokenSequence]  # what BatchStream and eval_batches take


# -- reading and checking the file -----------------------------------------------------------------------------------
def _data_format(path: Path) -> str:
    """The file's format (".txt" or ".jsonl") from its extension; anything else is refused."""
    if path.is_dir():
        raise LarsError(f"data path {path} is a directory; pass a {DATA_FORMATS} file")
    if not path.exists():
        raise LarsError(f"data file {path} does not exist; pass a {DATA_FORMATS} file")
    suffix = path.suffix.lower()
    if suffix in (".txt", ".jsonl"):
        return suffix
    if suffix == ".json":
        raise LarsError(f"data file {path} is .json, which is not read: convert it to .jsonl, one JSON object per "
                        f"line (a JSON array of examples: jq -c '.[]' {path.name} > {path.stem}.jsonl)")
    what = f"the extension {path.suffix}" if path.suffix else "no extension"
    raise LarsError(f"data file {path} has {what}, which is not a data format; pass a {DATA_FORMATS} file")


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line, its "\\n" kept; a UTF-8 byte-order mark at the start is dropped."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                yield n, raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise LarsError(f"{path} line {n}: not UTF-8 text (byte {e.start + 1} of the line is "
                                f"{raw[e.start]:#04x}); save the file as UTF-8") from None


def _describe(value) -> str:
    """A JSON value in an error message: a short scalar as written in JSON, a container by its type."""
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    text = str(value) if type(value) is int else json.dumps(value)  # json.dumps: NaN, true, null, "quoted"
    return text if len(text) <= 40 else text[:37] + "..."


def _string(value, name: str, where: str) -> str:
    """A string field, checked to be a string the tokenizer can take (no unpaired UTF-16 surrogate)."""
    if not isinstance(value, str):
        raise LarsError(f"{where}: {name} is {_describe(value)}, not a string; write it as a JSON string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise LarsError(f"{where}: {name} holds an unpaired surrogate \\u{ord(value[e.start]):04x} (character "
                        f"{e.start + 1}); write the character as a valid \\u pair or remove it") from None
    return value


def _records(path: Path) -> Iterator[tuple[int, dict]]:
    for n, line in _lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except RecursionError:
            raise LarsError(f"{path} line {n}: JSON nested too deeply to read; each line must be one JSON object "
                            f"such as {{\"text\": \"...\"}}") from None
        except ValueError as e:  # JSONDecodeError, or an integer past Python's 4300-digit limit
            reason = e.msg if isinstance(e, json.JSONDecodeError) else "a number too long to read"
            raise LarsError(f"{path} line {n}: not valid JSON ({reason}); each line must be one JSON object") \
                from None
        if not isinstance(record, dict):
            raise LarsError(f"{path} line {n}: expected a JSON object with text, prompt+completion, messages "
                            f"or input_ids, got {type(record).__name__}")
        yield n, record


def _line_error(path: Path, n: int, record: dict) -> LarsError:
    return LarsError(f"{path} line {n}: keys {sorted(record)} are not a known format; use {{\"text\"}}, "
                     f"{{\"prompt\", \"completion\"}}, {{\"messages\"}} or {{\"input_ids\"}}")


def _token_ids(value, vocab_size: int, where: str) -> list[int]:
    """An {"input_ids"} value, checked to be a non-empty flat list of ids in the model's vocabulary."""
    fix = f"give \"input_ids\" as a flat list of integer token ids in [0, {vocab_size})"
    if not isinstance(value, list):
        raise LarsError(f"{where}: \"input_ids\" is {_describe(value)}; {fix}")
    if not value:
        # mlx-lm fails on an example without tokens too (its TextDataset reads the last token): an empty list is most
        # likely a tokenising step that lost its text, so it is refused rather than trained on as nothing.
        raise LarsError(f"{where}: \"input_ids\" is empty; drop the line or give the example's token ids")
    for k, x in enumerate(value):
        if type(x) is not int:  # bool is an int subclass: true is not token 1
            raise LarsError(f"{where}: \"input_ids\" item {k} is {_describe(x)}; {fix}")
        if not 0 <= x < vocab_size:
            raise LarsError(f"{where}: token id {_describe(x)} (\"input_ids\" item {k}) is outside the model's "
                            f"vocabulary [0, {vocab_size}); tokenise with the bundle's tokenizer.json")
    return value


def _encode(tok: Tokenizer, text: str, where: str, special: bool = True) -> list[int]:
    ids = tok.encode(text, special)
    if ids and max(ids) >= tok.vocab_size:
        raise LarsError(f"{where}: the tokenizer gave token id {max(ids)}, outside the model's vocabulary "
                        f"[0, {tok.vocab_size}); the bundle's tokenizer.json does not match its model: re-export it")
    return ids


def _messages(tok: Tokenizer, messages, mask_prompt: bool, where: str) -> tuple[list[int], int]:
    """(tokens, masked prompt tokens) of a {"messages"} example."""
    fix = "give \"messages\" as a non-empty list of {\"role\": string, \"content\": string} objects"
    if not isinstance(messages, list) or not messages:
        raise LarsError(f"{where}: \"messages\" is {'empty' if messages == [] else _describe(messages)}; {fix}")
    for k, message in enumerate(messages, 1):
        if not isinstance(message, dict):
            raise LarsError(f"{where}: message {k} is {_describe(message)}; {fix}")
        for key in ("role", "content"):
            if key not in message:
                raise LarsError(f"{where}: message {k} has no \"{key}\"; {fix}")
            _string(message[key], f"message {k} \"{key}\"", where)

    def render(messages, add_generation_prompt: bool) -> str:
        try:
            return tok.chat.render(messages, add_generation_prompt)
        except LarsError as e:
            raise LarsError(f"{where}: {e}") from None

    full = render(messages, add_generation_prompt=False)
    if messages[-1]["role"] == "assistant":
        prompt = render(messages[:-1], add_generation_prompt=True)
        if full.startswith(prompt):
            prompt_ids = _encode(tok, prompt, where)
            completion_ids = _encode(tok, full[len(prompt):], where, special=False)
            return prompt_ids + completion_ids, len(prompt_ids) if mask_prompt else 0
    return _encode(tok, full, where), 0


def _load_jsonl(path: Path, tok: Tokenizer, mask_prompt: bool, data: SequenceSet) -> None:
    eos = [tok.eos_id] if tok.eos_id is not None else []
    for n, record in _records(path):
        where = f"{path} line {n}"
        if "text" in record:
            data.pack(_encode(tok, _string(record["text"], "\"text\"", where), where) + eos)
        elif "input_ids" in record:
            data.pack(_token_ids(record["input_ids"], tok.vocab_size, where))
        elif "prompt" in record and "completion" in record:
            prompt = _encode(tok, _string(record["prompt"], "\"prompt\"", where), where)
            completion = _encode(tok, _string(record["completion"], "\"completion\"", where), where, special=False)
            data.add_example(prompt + completion + eos, len(prompt) if mask_prompt else 0)
        elif "messages" in record:
            data.add_example(*_messages(tok, record["messages"], mask_prompt, where))
        else:
            raise _line_error(path, n, record)


def _special_affixes(tok: Tokenizer, where: str) -> tuple[list[int], list[int]] | None:
    """The ids tok.encode puts before and after a text's own (the post-processor's BOS / EOS), or None if it does
    more than wrap the text."""
    plain, wrapped = _encode(tok, "a", where, special=False), _encode(tok, "a", where)
    for p in range(len(wrapped) - len(plain) + 1):
        if wrapped[p:p + len(plain)] == plain:
            return wrapped[:p], wrapped[p + len(plain):]
    return None


def _safe_cut(text: str, tok: Tokenizer) -> int:
    """A position where tokenizing text[:at] and text[at:] apart gives the ids of tokenizing text whole, or 0.

    Candidates are line breaks after a non-space character, the latest first, with CUT_CHECK_CHARS of text after
    them. Byte-level BPE with GPT-2's pre-tokenizer pattern (SmolLM2, the tests' tokenizer) always starts a
    pre-token there: no pattern that matches a non-space character takes a "\\n" after it, and the whitespace
    patterns start at the first space character. Other tokenizers may join the two (Qwen's and Llama 3's pattern
    keeps punctuation with the line breaks after it) or add text at the start of each call (SentencePiece's "▁"),
    so each candidate is checked: the CUT_CHECK_CHARS either side are tokenized whole and in two, and the cut is
    taken only if both give the same ids. That check is local, so it is a strong heuristic rather than a proof for
    such tokenizers; one that fails every check (SentencePiece-style) gets the file as one piece, with memory
    growing with the file: give such data as .jsonl {"text"} lines instead.
    """
    end, tries = len(text) - CUT_CHECK_CHARS, 0
    while tries < CUT_TRIES:
        at = text.rfind("\n", 1, end)
        if at <= 0:
            return 0
        end = at
        if text[at - 1].isspace():
            continue
        tries += 1
        start = max(0, at - CUT_CHECK_CHARS)
        window = text[start:at + CUT_CHECK_CHARS]
        cut = at - start
        if tok.encode(window, False) == tok.encode(window[:cut], False) + tok.encode(window[cut:], False):
            return at
    return 0


def _text_pieces(path: Path, tok: Tokenizer, cut: bool) -> Iterator[str]:
    """A .txt file's text in consecutive pieces of about TEXT_PIECE_CHARS characters (one piece if not cut); pieces
    end at line breaks, so a file without any is one piece. Line ends are read as Python's text mode reads them:
    "\\r\\n" and "\\r" become "\\n"."""
    buffer: list[str] = []
    size, next_try = 0, TEXT_PIECE_CHARS
    for _, line in _lines(path):
        line = line.replace("\r\n", "\n").replace("\r", "\n")
        buffer.append(line)
        size += len(line)
        if cut and size >= next_try:
            text = "".join(buffer)
            at = _safe_cut(text, tok)
            if at:
                yield text[:at]
                text = text[at:]
                next_try = TEXT_PIECE_CHARS
            else:  # no safe cut yet: try again once the text doubled, not at every line
                next_try = 2 * size
            buffer, size = [text], len(text)
    text = "".join(buffer)
    if text:
        yield text


def _load_text(path: Path, tok: Tokenizer, data: SequenceSet) -> None:
    """The file as one document, tokenized piece by piece with the ids of tokenizing it whole (_safe_cut);
    a file of whitespace only gives no tokens."""
    affixes = _special_affixes(tok, str(path))
    prefix, suffix = affixes or ([], [])
    has_text = False
    data.pack(prefix)
    for piece in _text_pieces(path, tok, cut=affixes is not None):
        has_text = has_text or not piece.isspace()
        data.pack(_encode(tok, piece, str(path), special=affixes is None))
    data.pack(suffix)
    if not has_text:
        data.clear_stream()


def load_sequences(path: str | Path, tok: Tokenizer, seq_len: int, mask_prompt: bool = True,
                   store_dir: str | Path | None = None) -> SequenceSet:
    """Read a data file into sequences of at most seq_len + 1 tokens (inputs plus the last target).

    The token store's unnamed files go to `store_dir` (default: TMPDIR). `lars-ort train` passes the run directory:
    /tmp is a RAM-backed tmpfs on many systems, where the store would cost memory after all.

    The result counts what did not fit: `truncated` examples cut to seq_len + 1 tokens, `dropped` examples with no
    target token left (SequenceSet). Any bad value is a LarsError naming the file, the line and the fix.
    """
    path = Path(path)
    kind = _data_format(path)
    data = SequenceSet(seq_len, store_dir)
    try:
        if kind == ".jsonl":
            _load_jsonl(path, tok, mask_prompt, data)
        else:
            _load_text(path, tok, data)
    except OSError as e:  # the data file (the token store's own errors are LarsErrors already)
        data.close()
        raise LarsError(f"cannot read data file {path} ({e.strerror or e}); check that it is a readable file") \
            from None
    except BaseException:
        data.close()
        raise
    if not len(data):
        data.close()
        why = (f"{data.dropped} examples have no completion token within their first --seq-len + 1 = {seq_len + 1} "
               f"tokens; raise --seq-len or shorten their prompts" if data.dropped else
               "it is empty or holds only whitespace")
        raise LarsError(f"data file {path} holds no trainable tokens: {why}")
    return data


def collate(seqs: list[TokenSequence], pad_id: int) -> Batch:
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

    def __init__(self, seqs: Sequences, batch_size: int, pad_id: int, seed: int,
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


def eval_batches(seqs: Sequences, batch_size: int, pad_id: int, limit: int = 0) -> Iterator[Batch]:
    n = len(seqs) if not limit else min(len(seqs), limit * batch_size)
    for start in range(0, n, batch_size):
        yield collate(seqs[start:start + batch_size], pad_id)
