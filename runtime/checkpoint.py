"""The run directory and its checkpoints, written so that a crash or a full disk never damages a saved one.

    RUN/run.json                     the bundle this run belongs to (id, path) and the training arguments
    RUN/metrics.jsonl                one line per step / evaluation
    RUN/checkpoints/step-00000050/   checkpoint (ORT: adapters + AdamW state) and state.json (step, data position)
    RUN/latest                       the name of the newest complete checkpoint directory

A checkpoint is written to a hidden temporary directory, flushed, renamed into place, and only then does `latest`
move to it (os.replace is atomic); older checkpoints are pruned after that.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from lars_artifacts import Bundle, LarsError

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
LATEST = "latest"
CHECKPOINTS = "checkpoints"
ORT_CHECKPOINT = "checkpoint"
STATE_FILE = "state.json"


@dataclass
class Saved:
    path: Path
    state: dict

    @property
    def ort_checkpoint(self) -> Path:
        return self.path / ORT_CHECKPOINT


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def ensure_new_run(run: Path) -> None:
    """Refuse a directory that already holds a run: its checkpoints are never overwritten (--resume continues it)."""
    if (run / RUN_FILE).exists():
        raise LarsError(f"{run} already holds a run; pass --resume to continue it or choose another --out")


def create_run(run: Path, bundle: Bundle, args: dict) -> None:
    """Start a new run directory."""
    ensure_new_run(run)
    run.mkdir(parents=True, exist_ok=True)
    info = {"bundle": str(bundle.path.resolve()), "bundle_id": bundle.manifest.bundle_id, "args": args,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    _write_atomic(run / RUN_FILE, json.dumps(info, indent=2) + "\n")


def read_run(run: Path) -> dict:
    path = run / RUN_FILE
    if not path.is_file():
        raise LarsError(f"{run} is not a lars run directory ({RUN_FILE} is missing); pass the --out of a "
                        f"`lars-ort train` run")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise LarsError(f"{path} is not valid JSON; the run directory is damaged") from None


def check_run_bundle(run: Path, bundle: Bundle) -> dict:
    info = read_run(run)
    if info.get("bundle_id") != bundle.manifest.bundle_id:
        raise LarsError(f"run {run} belongs to bundle {info.get('bundle')} (id {info.get('bundle_id')}), not to "
                        f"{bundle.path} (id {bundle.manifest.bundle_id}); pass that bundle or start a new --out")
    return info


def save(run: Path, engine, state: dict, keep: int = 2) -> Path:
    """Write checkpoint + state for state["step"]; move `latest`; prune all but the `keep` newest."""
    root = run / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{state['step']:08d}"
    tmp = root / f".{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    engine.save(tmp / ORT_CHECKPOINT)
    _write_atomic(tmp / STATE_FILE, json.dumps(state, indent=2) + "\n")
    final = root / name
    if final.exists():  # re-saving the same step (e.g. the final save right after a periodic one)
        old = root / f".{name}.old"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    _fsync_dir(root)
    _write_atomic(run / LATEST, name + "\n")
    complete = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in complete[:-keep] if keep > 0 else []:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest(run: Path) -> Saved:
    pointer = run / LATEST
    if not pointer.is_file():
        raise LarsError(f"run {run} has no checkpoint yet ({LATEST} is missing); train it first, or start it "
                        f"again without --resume")
    path = run / CHECKPOINTS / pointer.read_text().strip()
    if not (path / ORT_CHECKPOINT).is_file() or not (path / STATE_FILE).is_file():
        raise LarsError(f"checkpoint {path} named by {pointer} is incomplete; the run directory was altered")
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except json.JSONDecodeError:
        raise LarsError(f"{path / STATE_FILE} is not valid JSON; the checkpoint is damaged") from None
    return Saved(path, state)
