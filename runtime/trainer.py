"""The training loop and the embeddable API.

`Trainer` is what an app uses (load a bundle, step on token batches or text, evaluate, save, export the adapter);
`train(args)` is the `lars-ort train` loop on top of it, reporting through callbacks (the progress bar and the
metrics file are callbacks too, so an embedding app gets the same numbers).
"""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence as Seq

import numpy as np

from lars_artifacts import TOKENIZER, TOKENIZER_CONFIG, Bundle, LarsError, load_bundle, sha256_file
from lars_artifacts.memory_model import budget_warning
from lars_artifacts.ort_checkpoint import read_checkpoint

from . import checkpoint as ckpt
from .adapters import write_peft_adapter
from .config import TrainingArgs
from .data import Batch, BatchStream, Sequence, Tokenizer, collate, eval_batches, load_sequences
from .engine import open_engine
from .metrics import MetricsWriter, Stopwatch, peak_rss_mb
from .schedule import learning_rate

Callback = Callable[[dict], None]


def load_tokenizer(bundle: Bundle) -> Tokenizer:
    config = json.loads(Path(bundle.file(TOKENIZER_CONFIG)).read_text())
    return Tokenizer(bundle.file(TOKENIZER), bundle.manifest.tokens, config.get("chat_template"),
                     bundle.manifest.vocab_size)


class Trainer:
    """Fine-tune a bundle's LoRA adapters from Python.

        trainer = Trainer("out/smollm2-lora")
        loss = trainer.step_text(["To be, or not to be"], lr=1e-4)
        trainer.export_adapter("my-adapter")     # PEFT format
    """

    def __init__(self, bundle: str | os.PathLike | Bundle, *, checkpoint: str | os.PathLike | None = None,
                 eval: bool = True, threads: int = 0, memory_arena: bool = False, memory_reuse: bool = False,
                 mmap_threshold_mb: float = 1.0, verify: bool = True, warn_budget: bool = True,
                 backend: str = "auto") -> None:
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle, verify=verify)
        self.engine = open_engine(self.bundle, backend, checkpoint=checkpoint, eval=eval, threads=threads,
                                  memory_arena=memory_arena, memory_reuse=memory_reuse,
                                  mmap_threshold_mb=mmap_threshold_mb)
        self.tokenizer = load_tokenizer(self.bundle)
        self.warn_budget = warn_budget
        self._warned_shapes: set[tuple[int, int]] = set()

    # -- steps on tokens or text -------------------------------------------------------------------------------
    def batch(self, input_ids, attention_mask=None, labels=None) -> Batch:
        """A Batch from token ids [b, t] (labels default to the next token; the last position has none)."""
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim != 2:
            raise LarsError(f"input_ids must be 2-D [batch, sequence], got shape {ids.shape}")
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
        if labels is None:
            labels = np.full_like(ids, -100)
            labels[:, :-1] = np.where(mask[:, 1:] == 1, ids[:, 1:], -100)
        return Batch(ids, mask, np.asarray(labels, dtype=np.int64))

    def text_batch(self, texts: Seq[str]) -> Batch:
        seqs = []
        for text in texts:
            tokens = np.asarray(self.tokenizer.encode(text)[: self.engine.max_seq_len + 1], dtype=np.int64)
            seqs.append(Sequence(tokens, np.ones(len(tokens), dtype=bool)))
        return collate(seqs, self.tokenizer.pad_id)

    def step(self, batch: Batch, lr: float) -> float:
        """One AdamW step; returns the loss before the update. Warns (once per batch shape) when the step is
        predicted to exceed the bundle's memory budget."""
        shape = tuple(batch.input_ids.shape)
        if self.warn_budget and shape not in self._warned_shapes:
            self._warned_shapes.add(shape)
            message = self.budget_warning(*shape)
            if message:
                warnings.warn(message, ResourceWarning, stacklevel=2)
        return self.engine.train_step(batch, lr)

    def budget_warning(self, batch_size: int, seq_len: int) -> str | None:
        """Why a step of this shape would exceed the bundle's memory budget, or None (also None without one)."""
        return budget_warning(self.bundle.manifest.memory, batch_size, seq_len)

    def step_text(self, texts: Seq[str], lr: float) -> float:
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
        return {"eval_loss": loss, "perplexity": math.exp(min(loss, 80.0)), "eval_tokens": count}

    # -- state ----------------------------------------------------------------------------------------------------
    def adapter_tensors(self) -> dict[str, np.ndarray]:
        return self.engine.adapter_tensors()

    def export_adapter(self, out: str | os.PathLike) -> Path:
        return write_peft_adapter(self.bundle, self.engine.adapter_tensors(), out)


@dataclass
class ProgressBar:
    """tqdm bar with loss, tokens/s and peak RSS."""

    total: int
    initial: int = 0

    def __post_init__(self) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=self.total, initial=self.initial, unit="step", dynamic_ncols=True)

    def __call__(self, record: dict) -> None:
        if "loss" in record:
            self.bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                 peak_mb=f"{record['peak_rss_mb']:.0f}", refresh=False)
            self.bar.update(record["step"] - self.bar.n)
        if "eval_loss" in record:
            self.bar.write(f"step {record['step']}: eval loss {record['eval_loss']:.4f}, "
                           f"perplexity {record['perplexity']:.2f}")

    def close(self) -> None:
        self.bar.close()


def _file_id(path: str) -> dict:
    return {"path": str(Path(path).resolve()), "sha256": sha256_file(path)}


def train(bundle_path: str | os.PathLike, args: TrainingArgs, callbacks: Seq[Callback] = ()) -> dict:
    """The `lars-ort train` loop. Returns a summary (first/last loss, final eval, where the checkpoint is)."""
    args.validate()
    if not args.data:
        raise LarsError("no training data: pass --data FILE (.txt or .jsonl)")
    if not args.out:
        raise LarsError("no run directory: pass --out RUN")
    bundle = load_bundle(bundle_path)
    if args.seq_len > bundle.manifest.max_seq_len:
        raise LarsError(f"--seq-len {args.seq_len} exceeds the model's context of {bundle.manifest.max_seq_len} "
                        f"tokens; lower --seq-len")
    over = budget_warning(bundle.manifest.memory, args.batch_size, args.seq_len)
    if over:
        print(f"warning: {over}", file=sys.stderr, flush=True)
    run = Path(args.out)
    tok = load_tokenizer(bundle)
    seqs = load_sequences(args.data, tok, args.seq_len, args.mask_prompt)
    eval_seqs = load_sequences(args.eval_data, tok, args.seq_len, args.mask_prompt) if args.eval_data else None
    data_id = _file_id(args.data)

    session = dict(eval=eval_seqs is not None, threads=args.threads, memory_arena=args.memory_arena,
                   memory_reuse=args.memory_reuse, mmap_threshold_mb=args.mmap_threshold_mb,
                   backend=args.backend, warn_budget=False)  # checked once above for --batch-size x --seq-len
    if args.resume:
        ckpt.check_run_bundle(run, bundle)
        saved = ckpt.latest(run)
        if saved.state.get("data", {}).get("sha256") != data_id["sha256"]:
            raise LarsError(f"--data {args.data} differs from the data run {run} was trained on "
                            f"({saved.state.get('data', {}).get('path')}); resume with the same file")
        start = int(saved.state["step"])
        position = saved.state["position"]
        trainer = Trainer(bundle, checkpoint=saved.ort_checkpoint, **session)
    else:
        ckpt.ensure_new_run(run)  # checked before the (slow) session load
        start, position = 0, {"epoch": 0, "index": 0}
        trainer = Trainer(bundle, **session)
        ckpt.create_run(run, bundle, args.to_dict())  # only once the bundle loaded: a failed start leaves no run
    stream = BatchStream(seqs, args.batch_size, tok.pad_id, args.seed, position["epoch"], position["index"])

    metrics = MetricsWriter(run / ckpt.METRICS_FILE)
    reporters: list[Callback] = [metrics.write, *callbacks]
    bar = ProgressBar(total=args.steps, initial=start) if args.progress else None
    if bar:
        reporters.append(bar)

    def report(record: dict) -> None:
        for cb in reporters:
            cb(record)

    def save(step: int) -> Path:
        state = {"step": step, "position": stream.state(), "data": data_id, "bundle_id": bundle.manifest.bundle_id}
        return ckpt.save(run, trainer.engine, state, keep=args.keep_checkpoints)

    def evaluate(step: int) -> dict:
        result = trainer.evaluate(eval_batches(eval_seqs, args.batch_size, tok.pad_id, args.eval_batches))
        record = {"step": step, **result, "peak_rss_mb": peak_rss_mb()}
        report(record)
        return record

    summary: dict = {"run": str(run), "start_step": start, "losses": []}
    step = start
    try:
        if eval_seqs is not None and start == 0:
            summary["initial_eval"] = evaluate(0)
        while step < args.steps:
            batch = stream.next()
            lr = learning_rate(step, lr=args.lr, steps=args.steps, warmup_steps=args.warmup_steps,
                               schedule=args.schedule, min_lr_ratio=args.min_lr_ratio)
            clock = Stopwatch()
            loss = trainer.step(batch, lr)
            seconds = clock.seconds()
            step += 1
            if not math.isfinite(loss):
                raise LarsError(f"loss became {loss} at step {step}; lower --lr (the last checkpoint is intact)")
            summary["losses"].append(loss)
            report({"step": step, "loss": loss, "lr": lr, "tokens": batch.tokens, "step_s": seconds,
                    "tokens_per_s": batch.tokens / seconds, "peak_rss_mb": peak_rss_mb()})
            if eval_seqs is not None and args.eval_every and step % args.eval_every == 0 and step < args.steps:
                evaluate(step)
            if args.save_every and step % args.save_every == 0 and step < args.steps:
                save(step)
        if eval_seqs is not None:
            summary["final_eval"] = evaluate(step)
        summary["checkpoint"] = str(save(step))
    except KeyboardInterrupt:
        if step > start:
            summary["checkpoint"] = str(save(step))
        raise
    finally:
        if bar:
            bar.close()
        metrics.close()
    summary["step"] = step
    return summary


def evaluate_file(bundle_path: str | os.PathLike, data: str, run: str | None = None, batch_size: int = 4,
                  seq_len: int = 256, mask_prompt: bool = True, threads: int = 0, backend: str = "auto") -> dict:
    """`lars-ort eval`: loss and perplexity of the bundle (with a run's latest adapters if given) on a file."""
    bundle = load_bundle(bundle_path)
    checkpoint = None
    if run:
        ckpt.check_run_bundle(Path(run), bundle)
        checkpoint = ckpt.latest(Path(run)).ort_checkpoint
    trainer = Trainer(bundle, checkpoint=checkpoint, eval=True, threads=threads, backend=backend)
    seqs = load_sequences(data, trainer.tokenizer, seq_len, mask_prompt)
    return trainer.evaluate(eval_batches(seqs, batch_size, trainer.tokenizer.pad_id))


def export_run_adapter(run: str | os.PathLike, out: str | os.PathLike, bundle_path: str | None = None) -> Path:
    """`lars-ort export-adapter`: the run's latest adapters as a PEFT adapter directory."""
    run = Path(run)
    info = ckpt.read_run(run)
    bundle = load_bundle(bundle_path or info["bundle"])
    ckpt.check_run_bundle(run, bundle)
    saved = ckpt.latest(run)
    tensors = read_checkpoint(saved.ort_checkpoint).parameters  # ORT's format, read without onnxruntime
    return write_peft_adapter(bundle, tensors, out)
