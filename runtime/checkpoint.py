"""The run directory: a small transactional store, so that a crash, a signal, a full disk or a damaged file never
loses a run or resumes it into a wrong state.

    RUN/run.json                     the bundle this run belongs to (id, path) and the training arguments
    RUN/metrics.jsonl                one line per step / evaluation
    RUN/.lock                        held (fcntl) by the process training this run
    RUN/checkpoints/step-00000050/   checkpoint (ORT: adapters + AdamW state), state.json (step, data position)
                                     and SHA256SUMS (of both, `sha256sum -c` format), written last
    RUN/latest                       the name of the newest checkpoint, for people and scripts

A checkpoint is written to a hidden temporary directory, flushed, and renamed into place: the rename is the commit,
so every `step-*` directory was complete when written. Loading does not trust `latest` (it may be stale, missing or
point anywhere): it takes the newest `step-*` directory that verifies (sha256 of each file, the state's fields, the
checkpoint's structure parsed without onnxruntime, finite tensors) and falls back to older ones, naming what was
damaged. ORT is never handed a file that has not been shown to be whole.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lars_artifacts import Bundle, BundleError, LarsError, sha256_file
from lars_artifacts.atomic import fsync_dir, write_atomic
from lars_artifacts.ort_checkpoint import read_checkpoint

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
LATEST = "latest"
LOCK_FILE = ".lock"
CHECKPOINTS = "checkpoints"
ORT_CHECKPOINT = "checkpoint"
STATE_FILE = "state.json"
SUMS_FILE = "SHA256SUMS"
STEP_DIR = re.compile(r"step-(\d{8})")


@dataclass
class Saved:
    """A verified checkpoint: its directory, its state.json, and the newer ones skipped as damaged."""

    path: Path
    state: dict
    skipped: list[str] = field(default_factory=list)

    @property
    def ort_checkpoint(self) -> Path:
        return self.path / ORT_CHECKPOINT

    @property
    def step(self) -> int:
        return int(self.state["step"])


class DamagedCheckpoint(LarsError):
    pass


# -- files -------------------------------------------------------------------------------------------------------

class RunLock:
    """An exclusive lock on a run directory for as long as a process trains it (released by the OS if it dies)."""

    def __init__(self, run: Path) -> None:
        self.path = run / LOCK_FILE
        self._file = None

    def __enter__(self) -> "RunLock":
        self._file = open(self.path, "a+")
        try:
            _lock(self._file)
        except OSError:
            self._file.seek(0)
            holder = self._file.read().strip() or "another process"
            self._file.close()
            raise LarsError(f"run {self.path.parent} is being trained by {holder}; wait for it to finish, stop it, "
                            f"or pass another --out") from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"pid {os.getpid()}\n")
        self._file.flush()
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()  # closing releases the lock
            self._file = None


def _lock(f) -> None:
    """Non-blocking exclusive lock; OSError if another process holds it."""
    if sys.platform == "win32":
        import msvcrt

        f.seek(0)
        msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
    else:
        import fcntl

        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


# -- run.json ----------------------------------------------------------------------------------------------------

# Arguments that decide the result of a run: resuming with another value would not continue the same run.
RESULT_ARGS = ("seed", "batch_size", "seq_len", "lr", "warmup_steps", "schedule", "min_lr_ratio", "steps",
               "mask_prompt", "method", "zo_perturbations", "zo_eps", "zo_eps_schedule", "zo_lora_fa")


def is_run(run: Path) -> bool:
    """Whether `run` holds a run (its run.json, or checkpoints of one whose run.json was lost)."""
    return (run / RUN_FILE).exists() or bool(step_dirs(run))


def ensure_new_run(run: Path) -> None:
    """Refuse a directory that already holds a run: its checkpoints are never overwritten (--resume continues it)."""
    if run.exists() and not run.is_dir():
        raise LarsError(f"--out {run} is a file, not a run directory; pass a directory path")
    if (run / RUN_FILE).exists():
        raise LarsError(f"{run} already holds a run; pass --resume to continue it or choose another --out")


def create_run(run: Path, bundle: Bundle, args: dict, data_sha256: str) -> None:
    """Start a new run directory (resumable from step 0 until its first checkpoint)."""
    ensure_new_run(run)
    run.mkdir(parents=True, exist_ok=True)
    info = {"bundle": str(bundle.path.resolve()), "bundle_id": bundle.manifest.bundle_id, "data_sha256": data_sha256,
            "args": args, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_atomic(run / RUN_FILE, json.dumps(info, indent=2) + "\n")


def read_run(run: Path) -> dict:
    path = run / RUN_FILE
    if not path.is_file():
        raise LarsError(f"{run} is not a lars run directory ({RUN_FILE} is missing); pass the --out of a "
                        f"`lars-ort train` run")
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise LarsError(f"{path} is not valid JSON; the run directory is damaged") from None
    if not isinstance(info, dict) or not isinstance(info.get("args", {}), dict):
        raise LarsError(f"{path} does not describe a run; the run directory is damaged")
    return info


def check_run_bundle(run: Path, bundle: Bundle) -> dict:
    info = read_run(run)
    if info.get("bundle_id") != bundle.manifest.bundle_id:
        raise LarsError(f"run {run} belongs to bundle {info.get('bundle')} (id {info.get('bundle_id')}), not to "
                        f"{bundle.path} (id {bundle.manifest.bundle_id}); pass that bundle or start a new --out")
    return info


def changed_args(info: dict, args: dict) -> dict[str, tuple]:
    """The result-deciding arguments that differ between run.json and this invocation: {name: (then, now)}."""
    then = info.get("args", {})
    return {k: (then.get(k), args.get(k)) for k in RESULT_ARGS if k in then and then.get(k) != args.get(k)}


def record_resume(run: Path, info: dict, args: dict, step: int, changed: dict) -> None:
    """run.json keeps the arguments in force and a history of resumes with what each changed."""
    info = dict(info)
    info.setdefault("resumes", []).append({"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                           "changed": {k: list(v) for k, v in changed.items()}})
    info["args"] = args
    write_atomic(run / RUN_FILE, json.dumps(info, indent=2) + "\n")


# -- metrics.jsonl -----------------------------------------------------------------------------------------------

def truncate_metrics(run: Path, step: int) -> int:
    """Drop the records after `step` (written by steps the checkpoint does not hold) and any torn last line, so a
    resumed run's metrics hold each step once. Returns how many lines were dropped."""
    path = run / METRICS_FILE
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    with open(path, "rb") as f:
        for line in f:
            try:
                record = json.loads(line)
                keep = isinstance(record, dict) and int(record.get("step", -1)) <= step and line.endswith(b"\n")
            except (ValueError, TypeError):
                keep = False
            if keep:
                kept.append(line.decode())
            else:
                dropped += 1
    if dropped:
        write_atomic(path, "".join(kept))
    return dropped


# -- checkpoints -------------------------------------------------------------------------------------------------

def step_of(path: Path) -> int:
    """The step of a checkpoint directory named step-NNNNNNNN."""
    return int(STEP_DIR.fullmatch(path.name).group(1))


def _point_latest(run: Path, name: str | None) -> None:
    """Move the `latest` pointer (to nothing: remove it). Only people and scripts read it, so a failure to write it
    is a warning, never the loss of a committed checkpoint."""
    try:
        if name:
            write_atomic(run / LATEST, name + "\n")
        else:
            (run / LATEST).unlink(missing_ok=True)
    except OSError as e:
        print(f"warning: could not update {run / LATEST} ({e.strerror or e}); the checkpoints are unaffected",
              file=sys.stderr, flush=True)


def _sha256_lines(directory: Path, names: tuple[str, ...]) -> str:
    return "".join(f"{sha256_file(directory / n)}  {n}\n" for n in names)


def _check_finite(tensors: dict[str, np.ndarray], what: str) -> None:
    for name, value in tensors.items():
        if not np.isfinite(value).all():
            raise DamagedCheckpoint(f"{what}: adapter tensor {name} holds NaN or inf")


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def step_dirs(run: Path) -> list[Path]:
    """The committed checkpoint directories, oldest first (temporaries and anything else are ignored)."""
    root = run / CHECKPOINTS
    if not root.is_dir():
        if root.exists():
            raise LarsError(f"{root} is not a directory; the run directory is damaged: move it aside to resume "
                            f"from step 0, or start a new --out")
        return []
    return sorted(p for p in root.iterdir() if STEP_DIR.fullmatch(p.name) and p.is_dir())


def save(run: Path, engine, state: dict, keep: int = 2) -> Path:
    """Write checkpoint + state for state["step"]; move `latest`; prune all but the `keep` newest.

    Refuses adapters holding NaN/inf. When the disk lacks room for one more checkpoint, the oldest ones beyond the
    newest are pruned first. An OSError (disk full, permissions) is one LarsError and leaves no partial files.
    """
    tensors = engine.adapter_tensors()
    _check_finite(tensors, f"step {state['step']}")
    root = run / CHECKPOINTS
    name = f"step-{state['step']:08d}"
    tmp = root / f".{name}.tmp"
    final = root / name
    try:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".*.tmp"):  # left by a process killed while saving
            shutil.rmtree(stale, ignore_errors=True)
        _make_room(root, keep, final)
        tmp.mkdir()
        engine.save(tmp / ORT_CHECKPOINT)
        write_atomic(tmp / STATE_FILE, json.dumps(state, indent=2) + "\n")
        write_atomic(tmp / SUMS_FILE, _sha256_lines(tmp, (ORT_CHECKPOINT, STATE_FILE)))
        fsync_dir(tmp)
        if final.exists():  # re-saving the same step (e.g. after a resume that replays it)
            old = root / f".{name}.old.tmp"
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        fsync_dir(root)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        kept = [p.name for p in step_dirs(run)]
        raise LarsError(f"cannot write checkpoint {final}: {e.strerror or e}; free space or fix permissions, then "
                        f"continue with --resume (" + (f"{kept[-1]} is intact" if kept else "no checkpoint yet")
                        + ")") from None
    _point_latest(run, name)
    for old in step_dirs(run)[:-keep]:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def quarantine(run: Path, from_step: int) -> list[str]:
    """Rename the checkpoints of steps >= from_step to `diverged-step-N`: kept for inspection, never resumed from
    or exported (only `step-*` directories are). Returns their new names."""
    moved = []
    for path in step_dirs(run):
        if step_of(path) >= from_step:
            target = path.with_name("diverged-" + path.name)
            shutil.rmtree(target, ignore_errors=True)
            path.rename(target)
            moved.append(target.name)
    if moved:
        remaining = step_dirs(run)
        _point_latest(run, remaining[-1].name if remaining else None)
    return moved


def _make_room(root: Path, keep: int, final: Path) -> None:
    """Prune the oldest checkpoints (never the newest) when the disk cannot hold one more of the newest's size."""
    existing = step_dirs(root.parent)
    if not existing:
        return
    needed = _dir_bytes(existing[-1]) * 1.1 + (1 << 20)
    while shutil.disk_usage(root).free < needed and len(existing) > 1:
        victim = existing.pop(0)
        if victim != final:
            shutil.rmtree(victim, ignore_errors=True)


def verify(path: Path) -> dict:
    """The state of checkpoint directory `path` after checking it whole; DamagedCheckpoint says what is not."""
    for name in (ORT_CHECKPOINT, STATE_FILE):
        if not (path / name).is_file():
            raise DamagedCheckpoint(f"{path}: {name} is missing")
    sums = path / SUMS_FILE
    if sums.is_file():  # checkpoints written before lars recorded sums have only the structural checks below
        listed = {}
        try:
            for line in sums.read_text().splitlines():
                digest, name = line.split("  ", 1)
                listed[name] = digest
        except (ValueError, UnicodeDecodeError):
            raise DamagedCheckpoint(f"{sums} is damaged") from None
        for name in (ORT_CHECKPOINT, STATE_FILE):
            if listed.get(name) != sha256_file(path / name):
                raise DamagedCheckpoint(f"{path / name} does not match its sha256 in {SUMS_FILE}")
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DamagedCheckpoint(f"{path / STATE_FILE} is not valid JSON") from None
    position = state.get("position") if isinstance(state, dict) else None
    ints = [state.get("step") if isinstance(state, dict) else None]
    ints += [position.get(k) for k in ("epoch", "index")] if isinstance(position, dict) else [None]
    if not all(type(v) is int and v >= 0 for v in ints):
        raise DamagedCheckpoint(f"{path / STATE_FILE} does not hold a step and a data position")
    if STEP_DIR.fullmatch(path.name) and step_of(path) != state["step"]:
        raise DamagedCheckpoint(f"{path / STATE_FILE} says step {state['step']}, its directory {path.name}")
    try:
        saved = read_checkpoint(path / ORT_CHECKPOINT)
    except BundleError as e:
        raise DamagedCheckpoint(str(e)) from None
    _check_finite(saved.parameters, str(path / ORT_CHECKPOINT))
    return state


def resumable(run: Path) -> Saved | None:
    """The newest checkpoint of `run` that verifies (None when the run has none yet). Damaged newer ones are listed
    in `skipped`; when every checkpoint is damaged, a LarsError names them all."""
    skipped = []
    for path in reversed(step_dirs(run)):
        try:
            return Saved(path, verify(path), skipped)
        except DamagedCheckpoint as e:
            skipped.append(str(e))
    if skipped:
        raise LarsError(f"every checkpoint of run {run} is damaged ({'; '.join(skipped)}); start a new run with "
                        f"another --out")
    return None


def latest(run: Path) -> Saved:
    """The newest checkpoint that verifies; an error when the run has none."""
    saved = resumable(run)
    if saved is None:
        raise LarsError(f"run {run} has no checkpoint yet; train it first (`lars-ort train ... --out {run}`)")
    return saved


def warn_skipped(saved: Saved) -> None:
    for reason in saved.skipped:
        print(f"warning: skipped a damaged checkpoint: {reason}; using {saved.path.name}", file=sys.stderr, flush=True)
