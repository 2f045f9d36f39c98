"""`lars-ort eval` and `lars-ort export-adapter` as library functions: a bundle (with a run's adapters) scored on a
file, a run's adapters written as a PEFT adapter."""

from __future__ import annotations

import os
from pathlib import Path

from lars_artifacts import LarsError, load_bundle
from lars_artifacts.ort_checkpoint import read_checkpoint

from . import checkpoint as ckpt
from .peft_adapter import write_peft_adapter
from .data import eval_batches, load_sequences
from .trainer import Trainer


def evaluate_file(bundle_path: str | os.PathLike, data: str, run: str | None = None, batch_size: int = 4,
                  seq_len: int = 256, mask_prompt: bool = True, threads: int = 0, backend: str = "auto") -> dict:
    """`lars-ort eval`: loss and perplexity of the bundle (with a run's latest adapters if given) on a file."""
    bundle = load_bundle(bundle_path)
    checkpoint = None
    if run:
        ckpt.check_run_bundle(Path(run), bundle)
        saved = ckpt.latest(Path(run))
        ckpt.warn_skipped(saved)
        checkpoint = saved.ort_checkpoint
    trainer = Trainer(bundle, checkpoint=checkpoint, load_eval=True, threads=threads, backend=backend)
    seqs = load_sequences(data, trainer.tokenizer, seq_len, mask_prompt)
    return trainer.evaluate(eval_batches(seqs, batch_size, trainer.tokenizer.pad_id))


def export_run_adapter(run: str | os.PathLike, out: str | os.PathLike, bundle_path: str | None = None) -> Path:
    """`lars-ort export-adapter`: the run's latest adapters as a PEFT adapter directory."""
    run = Path(run)
    info = ckpt.read_run(run)
    if not (bundle_path or info.get("bundle")):
        raise LarsError(f"{run / ckpt.RUN_FILE} does not name its bundle; pass --bundle")
    bundle = load_bundle(bundle_path or info["bundle"])
    ckpt.check_run_bundle(run, bundle)
    saved = ckpt.latest(run)  # verified: sums, structure, finite tensors
    ckpt.warn_skipped(saved)
    tensors = read_checkpoint(saved.ort_checkpoint).parameters  # ORT's format, read without onnxruntime
    return write_peft_adapter(bundle, tensors, out)
