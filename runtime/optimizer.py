"""AdamW over flat float32 buffers: the update ORT's training build applies (com.microsoft AdamWOptimizer, adam_mode 1,
the Hugging Face variant: bias correction folded into the learning rate, decoupled weight decay after the update).

The plain-onnxruntime backend keeps every adapter tensor, gradient and moment as a view into one flat buffer each,
so a step is a handful of vectorised numpy operations with no per-step allocation. The arithmetic follows ORT's CPU
kernel in float32, operation for operation, so both backends' adapters agree to float rounding (tested over 20 steps
against ORT's own optimizer: tests/test_backends.py).
"""

from __future__ import annotations

import numpy as np

from lars_artifacts import AdamWConfig


class AdamW:
    """Updates `params` in place from `grads`, keeping the moments `m1`, `m2` (all flat float32, same length)."""

    def __init__(self, config: AdamWConfig, size: int) -> None:
        self.config = config
        self._scratch = (np.empty(size, np.float32), np.empty(size, np.float32))  # reused every step

    def update(self, params: np.ndarray, grads: np.ndarray, m1: np.ndarray, m2: np.ndarray, lr: float,
               step: int) -> None:
        """One update; `step` counts from 1 (ORT passes the number of updates done so far + 1)."""
        c, f32 = self.config, np.float32
        tmp, update = self._scratch
        a, b = f32(c.beta1), f32(c.beta2)
        lr32 = f32(lr)
        lr_corrected = lr32
        if c.correct_bias:
            # As ORT's kernel: the powers in double, cast to float, the rest in float.
            alpha_correction = f32(1.0) - f32(np.float64(a) ** step)
            beta_correction = f32(1.0) - f32(np.float64(b) ** step)
            lr_corrected = f32(lr32 * f32(np.sqrt(beta_correction) / alpha_correction))
        m1 *= a
        np.multiply(grads, f32(1.0) - a, out=tmp)
        m1 += tmp
        m2 *= b
        np.multiply(grads, grads, out=tmp)
        tmp *= f32(1.0) - b
        m2 += tmp
        np.sqrt(m2, out=tmp)
        tmp += f32(c.eps)
        np.multiply(m1, lr_corrected, out=update)  # (lr_corrected * m1) / denom, in ORT's order
        update /= tmp
        params -= update
        if c.weight_decay:
            np.multiply(params, lr32 * f32(c.weight_decay), out=tmp)
            params -= tmp
