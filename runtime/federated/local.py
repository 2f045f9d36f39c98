"""One device's part of a federated round, without Flower: take the global adapter, train E steps on the local data,
hand back the adapter and how many tokens it was trained on.

Each round starts AdamW afresh from the global adapter (FedAvg's local optimiser; moments from another adapter would
point the wrong way), and the local data continues where the last round stopped. That position is kept in a small
state file written atomically after every round, so a device that was killed and restarted resumes its data stream
rather than replaying its first batches.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lars_artifacts import Bundle, LarsError, load_bundle, sha256_file
from lars_artifacts.atomic import write_atomic
from lars_artifacts.measure import Stopwatch, peak_rss_mb

from ..data import BatchStream, eval_batches, load_sequences
from ..engine import NonFiniteStep
from ..trainer import Trainer, check_lr
from .aggregate import update_problem


@dataclass
class LocalData:
    """A device's data: the training file, an optional held-out file, how it is cut into batches."""
    train: str
    eval: str | None = None
    batch_size: int = 1
    seq_len: int = 256
    seed: int = 0
    eval_batches: int = 0  # 0: the whole held-out file


class LocalClient:
    """A device's trainer for federated rounds (the plain-onnxruntime backend; backprop steps)."""

    def __init__(self, bundle: str | os.PathLike | Bundle, data: LocalData, state_file: str | os.PathLike | None = None,
                 threads: int = 0) -> None:
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        self.trainer = Trainer(self.bundle, load_eval=data.eval is not None, threads=threads, backend="ort")
        self.data = data
        tok = self.trainer.tokenizer
        self.seqs = load_sequences(data.train, tok, data.seq_len)
        self.held = load_sequences(data.eval, tok, data.seq_len) if data.eval else None
        self.data_sha256 = sha256_file(data.train)
        self.state_file = Path(state_file) if state_file else None
        self.rounds = 0
        self.stream = BatchStream(self.seqs, data.batch_size, tok.pad_id, data.seed)
        self._restore()

    # -- the data position across rounds and restarts ------------------------------------------------------------
    def position(self) -> dict:
        """Where this device's data stream stands (Flower keeps it in the node's context; the state file keeps it
        across a restart of the device)."""
        return {**self.stream.state(), "data_sha256": self.data_sha256, "rounds": self.rounds}

    def set_position(self, state: dict) -> None:
        """Continue from `position()`'s record; one from another data file or seed means nothing here: ignored."""
        if state.get("data_sha256") == self.data_sha256 and int(state.get("seed", -1)) == self.data.seed:
            self.stream.epoch, self.stream.index = int(state["epoch"]), int(state["index"])
            self.rounds = int(state.get("rounds", 0))

    def restore_position(self) -> None:
        """Back to the position of this device's state file (the start of its data without one): a process that
        served another device with the same files must not hand that device's position on."""
        self.stream.epoch, self.stream.index, self.rounds = 0, 0, 0
        self._restore()

    def _restore(self) -> None:
        if not (self.state_file and self.state_file.is_file()):
            return
        try:
            self.set_position(json.loads(self.state_file.read_text()))
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
            raise LarsError(f"federated client state {self.state_file} is damaged; delete it to start this "
                            f"device's data from the beginning") from None

    def _save_position(self) -> None:
        if self.state_file:
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.state_file, json.dumps(self.position()) + "\n")

    # -- a round --------------------------------------------------------------------------------------------------
    def _set_global(self, tensors: dict[str, np.ndarray]) -> None:
        reference = self.trainer.adapter_tensors()
        problem = update_problem(reference, tensors, 1)
        if problem:
            raise LarsError(f"the global adapter does not fit bundle {self.bundle.path}: {problem}; every device "
                            f"must train the bundle the server started from")
        self.trainer.engine.set_adapter_tensors(tensors)

    def fit(self, tensors: dict[str, np.ndarray], steps: int, lr: float, proximal_mu: float = 0.0) -> tuple[dict, dict]:
        """Train `steps` AdamW steps from the global adapter `tensors`; returns (adapter tensors, metrics). With
        proximal_mu > 0 each step's gradient gets FedProx's mu * (w - w_global)."""
        if not (isinstance(steps, int) and steps >= 1):
            raise LarsError(f"local steps {steps!r} must be an integer >= 1")
        check_lr(lr)
        if not (math.isfinite(proximal_mu) and proximal_mu >= 0):
            raise LarsError(f"proximal-mu {proximal_mu!r} must be a finite number >= 0")
        self._set_global(tensors)
        engine = self.trainer.engine
        engine.reset_optimizer()
        anchor = (float(proximal_mu), engine.params.copy()) if proximal_mu else None
        losses, tokens, examples, skipped = [], 0, 0, 0
        clock = Stopwatch()
        for _ in range(steps):
            batch = self.stream.next()
            try:
                losses.append(self.trainer.step(batch, lr, proximal=anchor))
            except NonFiniteStep:
                skipped += 1
                continue
            tokens += batch.label_tokens
            examples += batch.input_ids.shape[0]
        if not losses:
            raise LarsError(f"all {steps} local steps had a NaN/inf loss or gradient; lower the learning rate")
        self.rounds += 1
        self._save_position()
        metrics = {"train_loss": float(np.mean(losses)), "num-tokens": int(tokens), "num-examples": int(examples),
                   "skipped_steps": skipped, "train_seconds": clock.seconds(), "peak_rss_mb": peak_rss_mb()}
        return self.trainer.adapter_tensors(), metrics

    def evaluate(self, tensors: dict[str, np.ndarray]) -> dict:
        """Token-weighted loss of the adapter `tensors` on this device's held-out file."""
        if self.held is None:
            raise LarsError("this device has no held-out data; give it an eval-data file or set the server's "
                            "fraction-evaluate to 0")
        self._set_global(tensors)
        tok = self.trainer.tokenizer
        result = self.trainer.evaluate(eval_batches(self.held, self.data.batch_size, tok.pad_id,
                                                    self.data.eval_batches))
        return {"eval_loss": result["eval_loss"], "num-tokens": int(result["eval_tokens"])}
