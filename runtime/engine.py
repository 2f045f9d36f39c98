"""The training session of a bundle, on one of two backends behind one interface.

    ort           plain onnxruntime (the default, `auto`): the bundle's standard-ONNX training step
                  (training_step.onnx) in an InferenceSession, AdamW in numpy (engine_ort.py). Runs wherever
                  onnxruntime has a wheel: Linux x86-64 and aarch64, macOS, Windows, Python 3.11-3.13.
    ort-training  onnxruntime-training 1.19.2's Module and Optimizer on ORT's own training artifacts
                  (engine_ort_training.py); needs the training build as this process's onnxruntime.

and `--method zo` (zo.py): forward-only P-RGE steps on plain onnxruntime, no gradient graph loaded.

Both read and write run checkpoints in ORT's checkpoint format, so a run started on one resumes on the other.
An engine has: train_step(batch, lr), forward_backward(batch), eval_step(batch), adapter_tensors(), gradients(),
set_adapter_tensors(dict), save(path), and the attributes backend, vocab_size, max_seq_len, has_eval, adapter_names.
"""

from __future__ import annotations

import os

import numpy as np

from lars_artifacts import IGNORE_INDEX, Bundle, LarsError

from .config import BACKENDS, method_problem
from .data import Batch
from .session import arena_regions_for


class NonFiniteStep(LarsError):
    """A training step whose loss or gradients hold NaN or inf. The engine did not apply the update: the adapters
    and the optimizer state are those before the step."""

    def __init__(self, loss: float, what: str) -> None:
        super().__init__(f"the {what} of this step is NaN or inf (loss {loss}); the update was skipped")
        self.loss, self.what = loss, what


def open_engine(bundle: Bundle, backend: str = "auto", checkpoint: str | os.PathLike | None = None,
                method: str = "backprop", zo=None, **options):
    """The engine for `backend` (auto: plain onnxruntime) and training `method` (backprop, or zo: forward-only
    P-RGE steps with ZoConfig `zo`, zo.py)."""
    if backend not in BACKENDS:
        raise LarsError(f"--backend {backend!r} is unknown; use one of {', '.join(BACKENDS)}")
    problem = method_problem(method, backend)
    if problem:
        raise LarsError(problem)
    options["arena_regions"] = arena_regions_for(bundle.manifest.memory_plan, options.get("memory_arena", True),
                                                 options.get("arena_regions", "auto"))
    if method == "zo":
        from .zo import ZoEngine

        return ZoEngine(bundle, checkpoint=checkpoint, zo=zo, **options)
    if backend == "ort-training":
        from .engine_ort_training import OrtTrainingEngine

        return OrtTrainingEngine(bundle, checkpoint=checkpoint, **options)
    from .engine_ort import OrtEngine

    return OrtEngine(bundle, checkpoint=checkpoint, **options)


def batch_feeds(batch: Batch, vocab_size: int, max_seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """input_ids, attention_mask and flattened labels as the graphs take them, after the checks that keep an
    out-of-range id from reaching an ORT kernel (which reads out of bounds instead of failing)."""
    ids, mask, labels = batch.input_ids, batch.attention_mask, batch.labels
    if ids.ndim != 2 or mask.shape != ids.shape or labels.shape != ids.shape:
        raise LarsError(f"a batch needs input_ids, attention_mask and labels of one shape [batch, sequence]; got "
                        f"{list(ids.shape)}, {list(mask.shape)} and {list(labels.shape)}")
    t = ids.shape[1]
    if t > max_seq_len:
        raise LarsError(f"sequence length {t} exceeds the model's context of {max_seq_len} tokens; lower --seq-len")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise LarsError(f"token id {int(ids.max() if ids.max() >= vocab_size else ids.min())} is outside "
                        f"the model's vocabulary [0, {vocab_size}); tokenise with the bundle's tokenizer")
    if mask.size and ((mask != 0) & (mask != 1)).any():
        raise LarsError(f"attention_mask holds {int(mask[(mask != 0) & (mask != 1)][0])}; it must be 1 (token) or 0 "
                        f"(padding)")
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab_size))
    if bad.any():
        raise LarsError(f"label {int(labels[bad][0])} is outside the model's vocabulary [0, {vocab_size}) and is not "
                        f"{IGNORE_INDEX} (no loss); tokenise with the bundle's tokenizer")
    return (np.ascontiguousarray(ids, dtype=np.int64), np.ascontiguousarray(mask, dtype=np.int64),
            np.ascontiguousarray(labels.reshape(-1), dtype=np.int64))
