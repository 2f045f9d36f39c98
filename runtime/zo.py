"""Forward-only training: P-RGE zeroth-order gradient estimates from forward passes alone (MobiZO, arXiv 2409.15520).

No gradient graph is loaded: a step runs the bundle's forward (zo_step.onnx) at perturbed copies of the adapters and
updates them from the loss differences. Per step, q directions z_i ~ N(0, I) over the perturbed tensors (LoRA-FA, the
default: the B matrices only, A keeps its initial value), each regenerated from (seed, step, i), never stored:

    d_i = (L(θ + ε z_i) - L(θ - ε z_i)) / 2ε        a two-sided directional derivative, ≈ ∇L · z_i
    ĝ   = (1/q) Σ d_i z_i                           E[ĝ] = ∇L (z Gaussian, ε → 0)
    θ  ← θ - lr ĝ                                   ZO-SGD, as MeZO and P-RGE

The 2q losses come `parallel` adapter settings per forward: 1 runs them one at a time through zo_forward.onnx (the
training step's forward with its memory passes: row-chunked causal attention, the chunked loss; what a device that
cannot hold more needs); an even P runs P/2 (+, -) pairs at once through zo_step.onnx, the batch repeated P times
(P = 2 is P-RGE's inner loop, P = 2q both of its loops): fewer, larger matrix products, but the eval graph's whole
attention and logits, P times. A bundle exported before these graphs runs one setting at a time through its eval
graph.

The step is deterministic in (adapters, seed, step, batch), so a resumed run continues bit for bit; checkpoints,
metrics and adapter export are the backprop engine's (the AdamW moments stay zero).
"""

from __future__ import annotations

import os

import numpy as np

from lars_artifacts import Bundle, BundleError, LarsError, ZoModels

from .config import ZoConfig
from .data import Batch
from .engine import NonFiniteStep, batch_feeds
from .engine_ort import OrtEngine
from .session import first_line, session_options

__all__ = ["ZoConfig", "ZoEngine"]  # ZoConfig lives in config.py with the other options


class ZoEngine:
    """The engine interface (engine.py) with P-RGE steps; checkpoints, tensors and the eval are OrtEngine's."""

    method = "zo"

    def __init__(self, bundle: Bundle, checkpoint: str | os.PathLike | None = None, load_eval: bool = True,
                 threads: int = 0, memory_arena: bool = True, memory_reuse: bool = False,
                 mmap_threshold_mb: float = 1.0, priority_order: bool = True, profile_prefix: str | None = None,
                 zo: ZoConfig | None = None, arena_regions: str = "doubling") -> None:
        self.config = zo or ZoConfig()
        problem = self.config.problem()
        if problem:
            raise LarsError(problem)
        # The adapters, checkpoint I/O, mapped weights and (one setting per run) eval session of the backprop
        # engine, without its training session. Its eval runs the training step's forward (zo_forward.onnx).
        batched = self.config.parallel > 1
        self.base = OrtEngine(bundle, checkpoint=checkpoint, load_eval=not batched, training=False, threads=threads,
                              memory_arena=memory_arena, memory_reuse=memory_reuse,
                              mmap_threshold_mb=mmap_threshold_mb, priority_order=priority_order,
                              profile_prefix=profile_prefix, arena_regions=arena_regions)
        self.backend, self.bundle = self.base.backend, bundle
        self.vocab_size, self.max_seq_len = self.base.vocab_size, self.base.max_seq_len
        self.adapter_names = self.base.adapter_names
        self.has_eval = True  # the forward serves evaluation too
        spec = self.base.spec
        self.batched = batched
        if batched:
            zo_spec = spec.zo or ZoModels(reason="it was exported before forward-only training existed")
            if not zo_spec.file:
                raise BundleError(f"--zo-parallel {self.config.parallel} needs the bundle's zo_step.onnx, which "
                                  f"bundle {bundle.path} lacks ({zo_spec.reason}); use --zo-parallel 1, or "
                                  f"re-export the bundle with this lars")
            try:
                self.session = self.base._session(session_options(self.base.ort, *self.base.settings),
                                                  zo_spec.file)
            except Exception as e:
                raise BundleError(f"onnxruntime {self.base.ort.__version__} cannot load {zo_spec.file} of bundle "
                                  f"{bundle.path} ({first_line(e)[:300]}); re-export it with this lars") from None
            self.loss_output = zo_spec.losses
        else:
            self.session, self.loss_output = self.base.eval_session, self.base.eval_loss
        self.input_names = spec.inputs

        names = self.adapter_names
        self.perturbed = [n for n in names if ".lora_B." in n] if self.config.lora_fa else list(names)
        if not self.perturbed:
            raise BundleError(f"bundle {bundle.path} has no LoRA B tensors to train with LoRA-FA; pass --no-zo-lora-fa")
        params = self.base._views["params"]
        offsets = np.cumsum([0] + [params[n].size for n in self.perturbed])
        self._slices = {n: slice(int(a), int(b)) for n, a, b in zip(self.perturbed, offsets[:-1], offsets[1:])}
        self.dimension = int(offsets[-1])  # how many numbers are perturbed

    # -- the engine interface -------------------------------------------------------------------------------------
    @property
    def step_count(self) -> int:
        return self.base.step_count

    @property
    def learning_rate(self) -> float:
        return self.base.learning_rate

    def train_step(self, batch: Batch, lr: float) -> float:
        """One P-RGE step at learning rate `lr`; returns the mean of the 2q perturbed losses (≈ the loss at θ).
        A NaN/inf loss raises NonFiniteStep before anything is updated."""
        if batch.label_tokens == 0:
            raise LarsError("a training batch has no label tokens (all prompt or padding); check --mask-prompt")
        q, step = self.config.perturbations, self.base.step_count
        eps = self.config.eps_at(step)
        grads, params = self.base._views["grads"], self.base._views["params"]
        for name in self._slices:  # the estimate accumulates in the gradient buffer (B's views with LoRA-FA)
            grads[name][...] = 0.0
        losses = []
        pairs = 1 if self.config.parallel == 1 else self.config.parallel // 2
        for first in range(0, q, pairs):
            directions = [(i, self.direction(step, i)) for i in range(first, min(q, first + pairs))]
            if self.config.parallel == 1:
                scored = [(self._losses(batch, [(z, eps)])[0], self._losses(batch, [(z, -eps)])[0])
                          for _, z in directions]
            else:
                flat = self._losses(batch, [(z, s) for _, z in directions for s in (eps, -eps)])
                scored = list(zip(flat[0::2], flat[1::2]))
            for (_, z), (plus, minus) in zip(directions, scored):
                losses += [plus, minus]
                if not (np.isfinite(plus) and np.isfinite(minus)):
                    raise NonFiniteStep(float(plus if not np.isfinite(plus) else minus), "loss")
                # in float64: the difference of two float32 losses loses digits the estimate should keep
                scale = np.float32((float(plus) - float(minus)) / (2.0 * eps) / q)
                for name, where in self._slices.items():
                    grads[name].reshape(-1)[...] += scale * z[where]
        for name in self._slices:
            params[name] -= np.float32(lr) * grads[name]
        self.base.step_count += 1
        self.base.learning_rate = float(lr)
        return float(np.mean(losses))

    def direction(self, step: int, i: int) -> np.ndarray:
        """z_i of step `step` (0-based): standard normal over the perturbed tensors, from (seed, step, i) alone."""
        return np.random.default_rng([self.config.seed, step, i]).standard_normal(self.dimension, np.float32)

    def forward_backward(self, batch: Batch) -> float:
        """The loss at the current adapters (forward only: this engine has no gradient graph)."""
        return self.eval_step(batch)

    def eval_step(self, batch: Batch) -> float:
        return float(self._losses(batch, [None])[0])

    def adapter_tensors(self) -> dict[str, np.ndarray]:
        return self.base.adapter_tensors()

    def gradients(self) -> dict[str, np.ndarray]:
        """The last step's estimate ĝ (zero for the tensors it does not perturb)."""
        return self.base.gradients()

    def set_adapter_tensors(self, tensors: dict[str, np.ndarray]) -> None:
        self.base.set_adapter_tensors(tensors)

    def save(self, path: str | os.PathLike) -> None:
        self.base.save(path)

    # -- forwards -------------------------------------------------------------------------------------------------
    def _losses(self, batch: Batch, settings: list[tuple[np.ndarray, float] | None]) -> np.ndarray:
        """The batch's mean token loss at each adapter setting: None = θ, (z, s) = θ + s z on the perturbed
        tensors. One forward for all of them."""
        ids, mask, labels = batch_feeds(batch, self.vocab_size, self.max_seq_len)
        params = self.base._views["params"]
        count = len(settings)
        if self.batched:
            feeds = dict(zip(self.input_names, (np.tile(ids, (count, 1)), np.tile(mask, (count, 1)),
                                                np.tile(labels, count))))
        else:
            feeds = dict(zip(self.input_names, (ids, mask, labels)))
        for name in self.adapter_names:
            value = params[name]
            if name in self._slices and any(s is not None for s in settings):
                where = self._slices[name]
                rows = [value if s is None else value + np.float32(s[1]) * s[0][where].reshape(value.shape)
                        for s in settings]
                feeds[name] = np.stack(rows) if self.batched else rows[0]
            else:
                feeds[name] = np.broadcast_to(value, (count, *value.shape)) if self.batched else value
        if self.batched:
            feeds = {k: np.ascontiguousarray(v) for k, v in feeds.items()}
        out = self.session.run([self.loss_output], feeds, self.base.run_options)[0]
        return np.atleast_1d(np.asarray(out, np.float32))
