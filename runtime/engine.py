"""The ORT training session of a bundle, driven through onnxruntime-training's C bindings.

`import onnxruntime.training` pulls in torch; the runtime binds `onnxruntime.capi._pybind_state` (CheckpointState,
Module, Optimizer) directly, so nothing here needs torch, transformers or optimum.
"""

from __future__ import annotations

import os

import numpy as np

from lars_artifacts import (CHECKPOINT, EVAL_MODEL, OPTIMIZER_MODEL, TRAINING_MODEL, Bundle, BundleError, LarsError)

from .allocator import set_mmap_threshold
from .data import Batch


def _capi():
    from onnxruntime.capi import _pybind_state as C

    C.set_default_logger_severity(3)  # warnings and up; ORT logs every graph transformer at INFO
    return C


class Engine:
    """Module + Optimizer over one bundle. `eval=False` skips loading the eval graph (and its weight copy)."""

    def __init__(self, bundle: Bundle, checkpoint: str | os.PathLike | None = None, eval: bool = True,
                 threads: int = 0, memory_arena: bool = False, memory_reuse: bool = False,
                 mmap_threshold_mb: float = 1.0, priority_order: bool = True) -> None:
        C = _capi()
        self.C, self.bundle = C, bundle
        if not memory_arena:  # with the arena on, ORT keeps its own blocks and the heap matters less
            set_mmap_threshold(int(mmap_threshold_mb * 2**20))
        manifest = bundle.manifest
        self.vocab_size, self.max_seq_len = manifest.vocab_size, manifest.max_seq_len
        ckpt = str(checkpoint) if checkpoint else bundle.file(CHECKPOINT)
        try:
            self.state = C.load_checkpoint(ckpt)
        except Exception as e:
            raise BundleError(f"cannot read checkpoint {ckpt} ({_first_line(e)}); it is corrupt: restore it or "
                              f"re-export the bundle") from None
        options = C.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        # The CPU arena and memory patterns round and keep allocations for reuse: faster, but they hold memory a
        # device cannot spare (measured: README "Runtime memory settings").
        options.enable_cpu_mem_arena = memory_arena
        options.enable_mem_pattern = memory_arena
        # ORT's planner lets a later tensor of the same size reuse a dead tensor's buffer; the buffer then stays
        # allocated from the first tensor's death until the reuse, which can be the whole forward (a forward
        # temporary reused by a backward tensor). Measured on SmolLM2 at 1024 tokens: off is 0.6 GB lower
        # (README "Runtime memory settings"), and it is what lets LARS' freed inputs actually leave memory.
        options.enable_mem_reuse = memory_reuse
        # Quantized bundles dequantize a frozen matrix once for several readers that run one after the other (the
        # chunked loss' chunks). ORT's QDQ transformers would duplicate that DequantizeLinear per reader, and all
        # copies could run at once; lars' dequantizations are gated on step data, so nothing is constant-folded
        # with them off either (tested: export/passes/quantize_frozen_test.py).
        options.add_session_config_entry("session.disable_quant_qdq", "1")
        if priority_order:
            # ORT's priority-based order runs Shape/Size nodes as early as possible and forward nodes before
            # backward ones, so tensors the backward only measures (or that LARS projects) die with the forward.
            options.execution_order = C.ExecutionOrder.PRIORITY_BASED
        device = C.OrtDevice(C.OrtDevice.cpu(), C.OrtDevice.default_memory(), 0)
        try:
            self.module = C.Module(bundle.file(TRAINING_MODEL), self.state,
                                   bundle.file(EVAL_MODEL) if eval else None, device, options)
            self.optimizer = C.Optimizer(bundle.file(OPTIMIZER_MODEL), self.state, device, options)
        except Exception as e:
            raise BundleError(f"onnxruntime cannot load bundle {bundle.path} ({_first_line(e)[:300]}); "
                              f"re-export it with this lars") from None
        self.has_eval = eval
        self.adapter_names = [p["onnx_name"] for p in manifest.adapter["parameters"]]
        missing = [n for n in self.adapter_names if not self.state.has_parameter(n)]
        if missing:
            raise BundleError(f"checkpoint {ckpt} lacks adapter tensor {missing[0]}: it belongs to another bundle")

    # -- steps ---------------------------------------------------------------------------------------------------
    def _feeds(self, batch: Batch) -> list[np.ndarray]:
        b, t = batch.input_ids.shape
        if t > self.max_seq_len:
            raise LarsError(f"sequence length {t} exceeds the model's context of {self.max_seq_len} tokens; "
                            f"lower --seq-len")
        ids = batch.input_ids
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise LarsError(f"token id {int(ids.max() if ids.max() >= self.vocab_size else ids.min())} is outside "
                            f"the model's vocabulary [0, {self.vocab_size}); tokenise with the bundle's tokenizer")
        return [np.ascontiguousarray(ids, dtype=np.int64),
                np.ascontiguousarray(batch.attention_mask, dtype=np.int64),
                np.ascontiguousarray(batch.labels.reshape(-1), dtype=np.int64)]

    def train_step(self, batch: Batch, lr: float) -> float:
        """Forward + backward + AdamW update at learning rate `lr`; returns the batch's mean token loss."""
        if batch.label_tokens == 0:
            raise LarsError("a training batch has no label tokens (all prompt or padding); check --mask-prompt")
        loss = self.forward_backward(batch)
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
            raise RuntimeError("Engine was created with eval=False")
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


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
