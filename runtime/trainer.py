"""The embeddable API: `Trainer` is what an app uses (load a bundle, step on token batches or text, evaluate, export
the adapter). The `lars-ort train` loop on top of it is loop.py; eval and export-adapter are commands.py.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import warnings
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from lars_artifacts import TOKENIZER, TOKENIZER_CONFIG, Bundle, LarsError, load_bundle

from .peft_adapter import write_peft_adapter
from .config import ZoConfig
from .data import Batch, TokenSequence, Tokenizer, collate
from .engine import open_engine
from .session import arena_regions_warning

Callback = Callable[[dict], None]


def bundle_tokenizer(bundle: Bundle) -> Tokenizer:
    """The runtime's tokenizer of a bundle (tokenizers' tokenizer.json, the chat template, the manifest's tokens)."""
    config = json.loads(Path(bundle.file(TOKENIZER_CONFIG)).read_text())
    return Tokenizer(bundle.file(TOKENIZER), bundle.manifest.special_tokens, config.get("chat_template"),
                     bundle.manifest.vocab_size)


def _int_array(value, name: str) -> np.ndarray:
    """An int64 array of `value`, refusing floats, bools and strings that np.asarray would cast silently."""
    try:
        array = np.asarray(value)
    except ValueError:  # ragged nested lists
        raise LarsError(f"{name} must be a rectangular array of integers [batch, sequence]") from None
    if array.dtype.kind not in "iu" and not (array.size == 0 and array.dtype.kind == "f"):
        raise LarsError(f"{name} must hold integers, got dtype {array.dtype}")
    if array.dtype.kind == "u" and array.size and array.max() > np.iinfo(np.int64).max:
        raise LarsError(f"{name} holds {array.max()}, beyond int64")
    return array.astype(np.int64, copy=False)


def check_lr(lr) -> None:
    """A learning rate must be a finite number >= 0 (checked before a step touches the data or the adapters)."""
    if not isinstance(lr, (int, float, np.floating)) or not math.isfinite(lr) or lr < 0:
        raise LarsError(f"learning rate {lr!r} must be a finite number >= 0")


class Trainer:
    """Fine-tune a bundle's LoRA adapters from Python.

        trainer = Trainer("out/smollm2-lora")
        loss = trainer.step_text(["To be, or not to be"], lr=1e-4)
        trainer.export_adapter("my-adapter")     # PEFT format
    """

    def __init__(self, bundle: str | os.PathLike | Bundle, *, checkpoint: str | os.PathLike | None = None,
                 load_eval: bool = True, threads: int = 0, memory_arena: bool = True, arena_regions: str = "auto",
                 memory_reuse: bool = False, mmap_threshold_mb: float = 1.0, verify: bool = True,
                 warn_budget: bool = True, backend: str = "auto", method: str = "backprop", zo: ZoConfig | None = None,
                 training: bool = True, eval: bool | None = None) -> None:
        if eval is not None:  # the name before load_eval (it shadowed the builtin); kept working for callers
            warnings.warn("Trainer(eval=...) is deprecated; pass load_eval=...", DeprecationWarning, stacklevel=2)
            load_eval = eval
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle, verify=verify)
        regions = arena_regions_warning(self.bundle.manifest.memory_plan, memory_arena, arena_regions)
        if warn_budget and regions:
            warnings.warn(regions, ResourceWarning, stacklevel=2)
        # training=False: evaluation only, no training session loaded (its memory saved; plain onnxruntime backend)
        only_eval = {} if training else {"training": False}
        self.engine = open_engine(self.bundle, backend, checkpoint=checkpoint, method=method, zo=zo,
                                  load_eval=load_eval, threads=threads, memory_arena=memory_arena,
                                  arena_regions=arena_regions, memory_reuse=memory_reuse,
                                  mmap_threshold_mb=mmap_threshold_mb, **only_eval)
        self.method = method
        self.tokenizer = bundle_tokenizer(self.bundle)
        self.warn_budget = warn_budget
        self._warned_shapes: set[tuple[int, int]] = set()

    # -- steps on tokens or text -------------------------------------------------------------------------------
    def batch(self, input_ids, attention_mask=None, labels=None) -> Batch:
        """A Batch from token ids [b, t] (labels default to the next token; the last position has none)."""
        ids = _int_array(input_ids, "input_ids")
        if ids.ndim != 2:
            raise LarsError(f"input_ids must be 2-D [batch, sequence], got shape {ids.shape}")
        mask = np.ones_like(ids) if attention_mask is None else _int_array(attention_mask, "attention_mask")
        if labels is None:
            if mask.shape != ids.shape:
                raise LarsError(f"attention_mask has shape {list(mask.shape)}, input_ids {list(ids.shape)}; "
                                f"pass one mask value per token")
            labels = np.full_like(ids, -100)
            labels[:, :-1] = np.where(mask[:, 1:] == 1, ids[:, 1:], -100)
        return Batch(ids, mask, _int_array(labels, "labels"))

    def text_batch(self, texts: Sequence[str]) -> Batch:
        seqs = []
        for text in texts:
            tokens = np.asarray(self.tokenizer.encode(text)[: self.engine.max_seq_len + 1], dtype=np.int64)
            seqs.append(TokenSequence(tokens, np.ones(len(tokens), dtype=bool)))
        return collate(seqs, self.tokenizer.pad_id)

    def step(self, batch: Batch, lr: float, proximal: tuple[float, np.ndarray] | None = None) -> float:
        """One AdamW step (a P-RGE step with method="zo"); returns the loss before the update. Warns (once per
        batch shape) when the step is predicted to exceed the bundle's memory budget. A NaN/inf loss or gradient
        raises NonFiniteStep (a LarsError) and leaves the adapters and optimizer state as they were.
        `proximal` = (mu, anchor parameters): FedProx's mu·(w − anchor) joins the gradient (the plain-onnxruntime
        backprop engine only)."""
        check_lr(lr)
        if proximal is not None and "proximal" not in inspect.signature(self.engine.train_step).parameters:
            raise LarsError(f"a proximal term (FedProx) needs backprop steps on the onnxruntime backend; this trainer "
                            f"runs {type(self.engine).__name__}: use method='backprop', backend='ort'")
        shape = tuple(batch.input_ids.shape)
        if self.warn_budget and shape not in self._warned_shapes:
            self._warned_shapes.add(shape)
            message = self.budget_warning(*shape)
            if message:
                warnings.warn(message, ResourceWarning, stacklevel=2)
        if proximal is not None:
            return self.engine.train_step(batch, lr, proximal=proximal)
        return self.engine.train_step(batch, lr)

    def budget_warning(self, batch_size: int, seq_len: int) -> str | None:
        """Why a step of this shape would exceed the bundle's memory budget, or None (also None without one)."""
        if self.method == "zo":  # the budget's memory model is the backprop step's
            return None
        return self.bundle.manifest.memory_plan.over_budget(batch_size, seq_len)

    def step_text(self, texts: Sequence[str], lr: float) -> float:
        return self.step(self.text_batch(texts), lr)

    def evaluate(self, batches: Iterable[Batch]) -> dict:
        """Token-weighted mean loss and perplexity over batches."""
        total, count = 0.0, 0
        for batch in batches:
            n = batch.label_tokens
            if n:
                total += self.engine.eval_step(batch) * n
                count += n
        if not count:
            raise LarsError("evaluation data has no label tokens")
        loss = total / count
        if not math.isfinite(loss):
            raise LarsError(f"evaluation loss is {loss}: the adapters or the model produce NaN/inf on this data")
        return {"eval_loss": loss, "perplexity": math.exp(min(loss, 80.0)), "eval_tokens": count}

    # -- state ----------------------------------------------------------------------------------------------------
    def adapter_tensors(self) -> dict[str, np.ndarray]:
        return self.engine.adapter_tensors()

    def export_adapter(self, out: str | os.PathLike) -> Path:
        return write_peft_adapter(self.bundle, self.engine.adapter_tensors(), out)
