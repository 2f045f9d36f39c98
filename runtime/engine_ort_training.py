"""The `ort-training` backend: ORT's own training artifacts (training_model.onnx, optimizer_model.onnx, checkpoint)
driven through onnxruntime-training 1.19.2's C bindings.

It needs the training build as this process's `onnxruntime` (x86-64 only, Python <= 3.12); the default backend,
engine_ort.py, runs the same step on plain onnxruntime. `import onnxruntime.training` pulls in torch; this binds
`onnxruntime.capi._pybind_state` (CheckpointState, Module, Optimizer) directly.
"""

from __future__ import annotations

import os

import numpy as np

from lars_artifacts import (CHECKPOINT, EVAL_MODEL, OPTIMIZER_MODEL, ORT_TRAINING_BACKEND, TRAINING_MODEL, Bundle,
                            BundleError, LarsError)

from lars_artifacts.ort_checkpoint import read_checkpoint

from .data import Batch
from .engine import NonFiniteStep, batch_feeds
from .session import first_line as _first_line, session_options


def _capi():
    from onnxruntime.capi import _pybind_state as C

    C.set_default_logger_severity(3)  # warnings and up; ORT logs every graph transformer at INFO
    return C


class OrtTrainingEngine:
    """Module + Optimizer over one bundle. `load_eval=False` skips loading the eval graph (and its weight copy)."""

    backend = ORT_TRAINING_BACKEND

    def __init__(self, bundle: Bundle, checkpoint: str | os.PathLike | None = None, load_eval: bool = True,
                 threads: int = 0, memory_arena: bool = True, memory_reuse: bool = False,
                 mmap_threshold_mb: float = 1.0, priority_order: bool = True, arena_regions: str = "doubling") -> None:
        C = _capi()
        if not hasattr(C, "Module"):
            raise LarsError("--backend ort-training needs onnxruntime-training 1.19.2 as this environment's "
                            "onnxruntime; use --backend ort (plain onnxruntime), or run with the training build "
                            "first on PYTHONPATH (`python -m lars_export.ort_training home`)")
        self.C, self.bundle = C, bundle
        manifest = bundle.manifest
        self.vocab_size, self.max_seq_len = manifest.vocab_size, manifest.max_seq_len
        ckpt = str(checkpoint) if checkpoint else bundle.file(CHECKPOINT)
        read_checkpoint(ckpt)  # ORT's loader crashes on a damaged file; this raises BundleError naming it
        try:
            self.state = C.load_checkpoint(ckpt)
        except Exception as e:
            raise BundleError(f"cannot read checkpoint {ckpt} ({_first_line(e)}); it is corrupt: restore it or "
                              f"re-export the bundle") from None
        options = session_options(C, threads, memory_arena, memory_reuse, mmap_threshold_mb, priority_order,
                                  arena_regions=arena_regions)
        device = C.OrtDevice(C.OrtDevice.cpu(), C.OrtDevice.default_memory(), 0)
        try:
            self.module = C.Module(bundle.file(TRAINING_MODEL), self.state,
                                   bundle.file(EVAL_MODEL) if load_eval else None, device, options)
            self.optimizer = C.Optimizer(bundle.file(OPTIMIZER_MODEL), self.state, device, options)
        except Exception as e:
            raise BundleError(f"onnxruntime cannot load bundle {bundle.path} ({_first_line(e)[:300]}); "
                              f"re-export it with this lars") from None
        self.has_eval = load_eval
        self.adapter_names = [p.onnx_name for p in manifest.adapter_parameters]
        missing = [n for n in self.adapter_names if not self.state.has_parameter(n)]
        if missing:
            raise BundleError(f"checkpoint {ckpt} lacks adapter tensor {missing[0]}: it belongs to another bundle")

    # -- steps ---------------------------------------------------------------------------------------------------
    def _feeds(self, batch: Batch) -> list[np.ndarray]:
        return list(batch_feeds(batch, self.vocab_size, self.max_seq_len))

    def train_step(self, batch: Batch, lr: float) -> float:
        """Forward + backward + AdamW update at learning rate `lr`; returns the batch's mean token loss. A NaN/inf
        loss or gradient raises NonFiniteStep before anything is updated."""
        if batch.label_tokens == 0:
            raise LarsError("a training batch has no label tokens (all prompt or padding); check --mask-prompt")
        loss = self.forward_backward(batch)
        what = "loss" if not np.isfinite(loss) else None
        if what is None and not all(np.isfinite(g).all() for g in self.gradients().values()):
            what = "gradient"
        if what:
            self.module.lazy_reset_grad()
            raise NonFiniteStep(loss, what)
        self.optimizer.set_learning_rate(lr)
        self.optimizer.optimizer_step()
        self.module.lazy_reset_grad()
        return loss

    def forward_backward(self, batch: Batch) -> float:
        """Loss and gradients (left in the gradient buffers, see `gradients`), no update."""
        out = self.C.OrtValueVector()
        self.module.train_step(self._feeds(batch), out)
        return float(out[0].numpy())

    def eval_step(self, batch: Batch) -> float:
        if not self.has_eval:
            raise RuntimeError("Engine was created with load_eval=False")
        out = self.C.OrtValueVector()
        self.module.eval_step(self._feeds(batch), out)
        return float(out[0].numpy())

    # -- tensors -------------------------------------------------------------------------------------------------
    def adapter_tensors(self) -> dict[str, np.ndarray]:
        return {n: self.state.get_parameter(n).data.numpy().copy() for n in self.adapter_names}

    def gradients(self) -> dict[str, np.ndarray]:
        return {n: self.state.get_parameter(n).grad.numpy().copy() for n in self.adapter_names}

    def set_adapter_tensors(self, tensors: dict[str, np.ndarray]) -> None:
        device = self.C.OrtDevice(self.C.OrtDevice.cpu(), self.C.OrtDevice.default_memory(), 0)
        for name, value in tensors.items():
            array = np.ascontiguousarray(value, dtype=np.float32)  # must outlive the OrtValue that wraps it
            self.state.copy_parameter_from(name, self.C.OrtValue.ortvalue_from_numpy(array, device))

    def save(self, path: str | os.PathLike) -> None:
        """ORT checkpoint with adapters and optimizer state (not atomic by itself: see checkpoint.py)."""
        self.C.save_checkpoint(self.state, str(path), True)
