"""The `lars-ort train` loop on top of the `Trainer` API: the run directory (new or resumed), the data stream, the
learning-rate schedule, evaluation and checkpoints, signals and training health; it reports through callbacks (the
progress bar and the metrics file are callbacks too, so an embedding app gets the same numbers).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from lars_artifacts import Bundle, LarsError, load_bundle, sha256_file
from lars_artifacts.measure import Stopwatch, peak_rss_mb

from . import checkpoint as ckpt
from .config import TrainingArgs, ZoConfig, flag
from .data import BatchStream, eval_batches, load_sequences
from .engine import NonFiniteStep
from .health import TrainingHealth
from .interrupt import StopOnSignal
from .metrics import MetricsWriter, available_memory_bytes
from .schedule import learning_rate
from .session import arena_regions_warning
from .trainer import Trainer, bundle_tokenizer

Callback = Callable[[dict], None]

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


def _last_saved(saved_step: int | None) -> str:
    return (f"checkpoint step {saved_step} is intact" if saved_step is not None
            else "no checkpoint was written; the run restarts from step 0 with --resume")


def train(bundle_path: str | os.PathLike, args: TrainingArgs, callbacks: Sequence[Callback] = (),
          handle_signals: bool = True) -> dict:
    """The `lars-ort train` loop. Returns a summary (first/last loss, final eval, where the checkpoint is, and
    `interrupted`: the signal that stopped it early, if one did).

    SIGINT/SIGTERM stop it after the current step with a checkpoint (interrupt.py; `handle_signals=False` leaves an
    embedding app's handlers alone). A step with a NaN/inf loss or gradient is skipped and counted; adapters that
    are non-finite or diverged are never saved (health.py).
    """
    args.validate()
    if not args.data:
        raise LarsError("no training data: pass --data FILE (.txt or .jsonl)")
    if not args.out:
        raise LarsError("no run directory: pass --out RUN")
    bundle = load_bundle(bundle_path)
    if args.seq_len > bundle.manifest.max_seq_len:
        raise LarsError(f"--seq-len {args.seq_len} exceeds the model's context of {bundle.manifest.max_seq_len} "
                        f"tokens; lower --seq-len")
    run = Path(args.out)
    resume = args.resume
    if resume and not ckpt.is_run(run):  # killed before it wrote anything: nothing is lost by starting it
        print(f"warning: {run} holds no run to resume (no {ckpt.RUN_FILE}); starting it from step 0",
              file=sys.stderr, flush=True)
        resume = False
    if not resume:
        ckpt.ensure_new_run(run)  # checked before the (slow) data and session load
    with contextlib.ExitStack() as held:
        if resume:  # a second trainer of this run is refused before it loads anything
            held.enter_context(ckpt.RunLock(run))
        return _train_locked(bundle, run, resume, args, callbacks, handle_signals, held)


def _train_locked(bundle: Bundle, run: Path, resume: bool, args: TrainingArgs, callbacks: Sequence[Callback],
                  handle_signals: bool, held: contextlib.ExitStack) -> dict:
    # the memory model is the backprop step's: a forward-only run stays below it
    over = bundle.manifest.memory_plan.over_budget(args.batch_size, args.seq_len) if args.method != "zo" else None
    if over:
        print(f"warning: {over}", file=sys.stderr, flush=True)
    regions = arena_regions_warning(bundle.manifest.memory_plan, args.memory_arena, args.arena_regions)
    if regions:
        print(f"warning: {regions}", file=sys.stderr, flush=True)
    _check_fits_in_memory(bundle, args.batch_size, args.seq_len, model=args.method != "zo")
    tok = bundle_tokenizer(bundle)
    run.mkdir(parents=True, exist_ok=True)  # the token store lives beside the checkpoints, not in a RAM /tmp
    seqs = load_sequences(args.data, tok, args.seq_len, args.mask_prompt, store_dir=run)
    eval_seqs = (load_sequences(args.eval_data, tok, args.seq_len, args.mask_prompt, store_dir=run)
                 if args.eval_data else None)
    for name, loaded in (("--data", seqs), ("--eval-data", eval_seqs)):
        _report_cut_examples(name, loaded, args.seq_len)
    data_id = _file_id(args.data)

    session = dict(load_eval=eval_seqs is not None, threads=args.threads, memory_arena=args.memory_arena,
                   memory_reuse=args.memory_reuse, mmap_threshold_mb=args.mmap_threshold_mb,
                   arena_regions=args.arena_regions,
                   backend=args.backend, warn_budget=False,  # checked once above for --batch-size x --seq-len
                   method=args.method, zo=ZoConfig.from_args(args) if args.method == "zo" else None)
    if not resume:
        held.enter_context(ckpt.RunLock(run))
    saved = None
    if resume:
        info = ckpt.check_run_bundle(run, bundle)
        saved = ckpt.resumable(run)
        if saved:
            ckpt.warn_skipped(saved)
        else:
            print(f"warning: run {run} has no checkpoint yet; training it from step 0", file=sys.stderr,
                  flush=True)
        changed = _check_resume(run, info, args, data_id, saved)
    start = saved.step if saved else 0
    position = saved.state["position"] if saved else {"epoch": 0, "index": 0}
    if position["index"] > len(seqs):
        raise LarsError(f"checkpoint {saved.path} is at data position {position['index']} of a file with "
                        f"{len(seqs)} sequences; the run directory was altered, start a new --out")
    trainer = Trainer(bundle, checkpoint=saved.ort_checkpoint if saved else None, **session)
    if resume:
        ckpt.truncate_metrics(run, start)
        ckpt.record_resume(run, info, args.to_dict(), start, changed)
    else:
        ckpt.create_run(run, bundle, args.to_dict(), data_id["sha256"])  # once the bundle loaded
    stream = BatchStream(seqs, args.batch_size, tok.pad_id, args.seed, position["epoch"], position["index"])
    best_loss = saved.state.get("best_loss") if saved else None
    return _loop(run, bundle, trainer, stream, args, eval_seqs, data_id, start, best_loss, callbacks,
                 handle_signals)


def _check_fits_in_memory(bundle: Bundle, batch_size: int, seq_len: int, model: bool = True) -> None:
    """Say so before a step the machine cannot hold, instead of being OOM-killed mid-run: an error when the batch's
    own token arrays exceed the available memory, a warning when the bundle's memory model predicts a larger peak."""
    available = available_memory_bytes()
    if available is None:
        return
    arrays = batch_size * (seq_len + 1) * 8 * 4  # ids, mask, labels, and the collation's copy, int64
    if arrays > available:
        raise LarsError(f"--batch-size {batch_size} x --seq-len {seq_len} needs {arrays / 2**30:.1f} GB for the token "
                        f"arrays alone; this machine has {available / 2**30:.1f} GB available: lower --batch-size")
    fitted = bundle.manifest.memory_plan.model if model else None
    if fitted:
        peak = fitted.peak_bytes(batch_size, seq_len)
        if peak > available:
            print(f"warning: a step of batch {batch_size} x {seq_len} tokens is predicted to peak at "
                  f"{peak / 2**30:.2f} GB; this machine has {available / 2**30:.2f} GB available: lower --batch-size "
                  f"or --seq-len, or export with more memory passes (README, A memory budget)", file=sys.stderr,
                  flush=True)


def _report_cut_examples(option: str, dataset, seq_len: int) -> None:
    """Examples cut to --seq-len or dropped are said, never silent."""
    truncated, dropped = getattr(dataset, "truncated", 0), getattr(dataset, "dropped", 0)
    if truncated or dropped:
        print(f"warning: {option}: {truncated} examples longer than --seq-len {seq_len} were cut"
              + (f", {dropped} dropped (no completion token left within --seq-len)" if dropped else "")
              + "; raise --seq-len to keep them whole", file=sys.stderr, flush=True)


def _check_resume(run: Path, info: dict, args: TrainingArgs, data_id: dict, saved) -> dict[str, tuple]:
    """A resume continues the same run: same data, and the same result-deciding arguments unless overridden.
    Returns the changed arguments ({name: (then, now)}) that --resume-with-changes accepted."""
    then = saved.state.get("data", {}).get("sha256") if saved else info.get("data_sha256")
    if then is not None and then != data_id["sha256"]:
        raise LarsError(f"--data {args.data} differs from the data run {run} was trained on "
                        f"({info.get('args', {}).get('data')}); resume with the same file")
    changed = ckpt.changed_args(info, args.to_dict())
    if changed and not args.resume_with_changes:
        listed = ", ".join(f"{flag(k)} {now} (was {was})" for k, (was, now) in changed.items())
        raise LarsError(f"--resume with {listed} would not continue run {run} as it was started; pass the "
                        f"original values, or add --resume-with-changes to continue with these")
    return changed


def _loop(run: Path, bundle: Bundle, trainer: Trainer, stream: BatchStream, args: TrainingArgs, eval_seqs,
          data_id: dict, start: int, best_loss: float | None, callbacks: Sequence[Callback],
          handle_signals: bool) -> dict:
    tok = trainer.tokenizer
    metrics = MetricsWriter(run / ckpt.METRICS_FILE)
    reporters: list[Callback] = [metrics.write, *callbacks]
    bar = ProgressBar(total=args.steps, initial=start) if args.progress else None
    if bar:
        reporters.append(bar)
    health = TrainingHealth(bundle.manifest.vocab_size, max_skipped=args.max_skipped_steps)
    if isinstance(best_loss, (int, float)):
        health.best = float(best_loss)
    saved_step: int | None = start if start else None

    def report(record: dict) -> None:
        for cb in reporters:
            cb(record)

    def save(step: int) -> Path:
        nonlocal saved_step
        if not health.healthy:
            raise LarsError(f"not saving step {step}: {health.unhealthy_reason(_last_saved(saved_step))}")
        state = {"step": step, "position": stream.state(), "data": data_id, "bundle_id": bundle.manifest.bundle_id,
                 "best_loss": health.best if math.isfinite(health.best) else None}
        path = ckpt.save(run, trainer.engine, state, keep=args.keep_checkpoints)
        saved_step = step
        stop.abandon_message = f"continue with --resume ({_last_saved(step)})"
        return path

    def evaluate(step: int) -> dict:
        result = trainer.evaluate(eval_batches(eval_seqs, args.batch_size, tok.pad_id, args.eval_batches))
        record = {"step": step, **result, "peak_rss_mb": peak_rss_mb()}
        report(record)
        return record

    summary: dict = {"run": str(run), "start_step": start, "losses": [], "skipped_steps": 0}
    step = start
    in_step = False  # between taking a batch and finishing its update: a checkpoint now would not be consistent
    stop = StopOnSignal(handle_signals, f"continue with --resume ({_last_saved(saved_step)})")
    try:
        with stop:
            if eval_seqs is not None and start == 0:
                summary["initial_eval"] = evaluate(0)
            while step < args.steps and not stop.requested:
                in_step = True
                batch = stream.next()
                lr = learning_rate(step, lr=args.lr, steps=args.steps, warmup_steps=args.warmup_steps,
                                   schedule=args.schedule, min_lr_ratio=args.min_lr_ratio)
                clock = Stopwatch()
                try:
                    loss, skipped = trainer.step(batch, lr), None
                except NonFiniteStep as e:
                    loss, skipped = e.loss, e.what
                seconds = clock.seconds()
                step += 1
                in_step = False
                record = {"step": step, "loss": loss, "lr": lr, "tokens": batch.tokens, "step_s": seconds,
                          "tokens_per_s": batch.tokens / seconds, "peak_rss_mb": peak_rss_mb()}
                if skipped:
                    summary["skipped_steps"] += 1
                    record["skipped"] = f"non-finite {skipped}"
                    print(f"warning: step {step}: the {skipped} is NaN or inf; update skipped", file=sys.stderr,
                          flush=True)
                report(record)
                if skipped:
                    health.skipped(step, skipped, _last_saved(saved_step))
                    continue
                summary["losses"].append(loss)
                if health.observe(step, loss):  # the adapters of step - 1 are the diverged ones
                    moved = ckpt.quarantine(run, step - 1)
                    if moved:
                        remaining = ckpt.step_dirs(run)
                        saved_step = ckpt.step_of(remaining[-1]) if remaining else None
                        print(f"warning: step {step}: the loss rose to {loss:.3f}, near ln(vocab) "
                              f"{health.uniform_loss:.3f}; moved the checkpoint(s) holding these adapters aside: "
                              f"{', '.join(moved)}", file=sys.stderr, flush=True)
                health.raise_if_diverged_too_long(_last_saved(saved_step))
                if eval_seqs is not None and args.eval_every and step % args.eval_every == 0 and step < args.steps:
                    evaluate(step)
                if (args.save_every and step % args.save_every == 0 and step < args.steps
                        and health.healthy and not stop.requested):
                    save(step)
            if stop.requested:
                summary["interrupted"] = stop.requested
                summary["exit_code"] = stop.exit_code
                if step > start and saved_step != step:
                    summary["checkpoint"] = str(save(step))
                elif saved_step is not None:
                    summary["checkpoint"] = str(run / ckpt.CHECKPOINTS / f"step-{saved_step:08d}")
            else:
                if eval_seqs is not None:
                    summary["final_eval"] = evaluate(step)
                    final_loss = summary["final_eval"]["eval_loss"]
                else:  # the last update is judged by no step's loss: one more forward pass on the next batch
                    peek = BatchStream(stream.seqs, args.batch_size, tok.pad_id, args.seed, stream.epoch, stream.index)
                    final_loss = trainer.engine.forward_backward(peek.next()) if health.judging else 0.0
                if health.looks_diverged(final_loss):
                    raise LarsError(f"training diverged at the last step: its adapters score a loss of "
                                    f"{final_loss:.3f}, near ln(vocab) = {health.uniform_loss:.3f} (a uniform guess),"
                                    f" after {health.best:.3f}; not saved; lower --lr; {_last_saved(saved_step)}")
                summary["checkpoint"] = str(save(step))
    except KeyboardInterrupt:  # raised by a callback (or SIGINT where the handler is not ours): save if consistent
        if step > start and not in_step and health.healthy and saved_step != step:
            summary["checkpoint"] = str(save(step))
        raise
    finally:
        if bar:
            bar.close()
        metrics.close()
    summary["step"] = step
    return summary
