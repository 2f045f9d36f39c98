"""The `ort` backend (the default): the bundle's standard-ONNX training step on plain onnxruntime.

training_step.onnx takes the batch and every adapter tensor as inputs and returns the loss and every adapter
gradient as outputs (the exporter lowered ORT's training-only ops to standard ONNX: lars_export.lowering). This
engine keeps the adapters, their gradients and both AdamW moments in four flat float32 buffers; each tensor is a
view into its buffer, bound to the session once through IO binding, so ORT reads the adapters from and writes the
gradients into those buffers directly, and the AdamW update (optimizer.py) runs over the flat buffers in place.

The frozen weights are mapped from the bundle's weights.onnx_data once (numpy memmap, pages read on first use) and
handed to the training and the eval session as the same shared initializers (SessionOptions.add_initializer: ORT
uses the caller's buffer as it is), with prepacking off (session.py). Measured on SmolLM2-135M's default bundle at
512 tokens, a train step, an eval and a train step: peak RSS 1,456 MB this way; 2,077 MB with each session mapping
the file itself (the eval session's mapping is a second ~600 MB of resident pages); and 1,442 MB right after load
through add_external_initializers, which copies them.
"""

from __future__ import annotations

import os

import numpy as np

from lars_artifacts import (ORT_BACKEND, WEIGHTS, AdamWConfig, Bundle, BundleError, LarsError)
from lars_artifacts.ort_checkpoint import OptimizerState, OrtCheckpoint, read_checkpoint, write_checkpoint

from .data import Batch
from .engine import NonFiniteStep, batch_feeds
from .optimizer import AdamW
from .session import first_line, run_options, session_options


class OrtEngine:
    backend = ORT_BACKEND

    def __init__(self, bundle: Bundle, checkpoint: str | os.PathLike | None = None, load_eval: bool = True,
                 training: bool = True, threads: int = 0, memory_arena: bool = True, memory_reuse: bool = False,
                 mmap_threshold_mb: float = 1.0, priority_order: bool = True,
                 profile_prefix: str | None = None, arena_regions: str = "doubling") -> None:
        import onnxruntime as ort

        ort.set_default_logger_severity(3)  # warnings and up; ORT logs every graph transformer at INFO
        self.ort, self.bundle = ort, bundle
        manifest = bundle.manifest
        spec = manifest.ort_step
        if spec is None:
            raise BundleError(f"bundle {bundle.path} has no standard-ONNX training step; re-export it with this "
                              f"lars (`lars-export`)")
        self.spec = spec
        self.vocab_size, self.max_seq_len = manifest.vocab_size, manifest.max_seq_len
        parameters = manifest.adapter_parameters
        self.adapter_names = [p.onnx_name for p in parameters]
        shapes = [tuple(p.shape) for p in parameters]

        # Adapters, gradients and moments: one flat buffer each, a view per tensor.
        sizes = [int(np.prod(s)) for s in shapes]
        total = sum(sizes)
        self.params, self.grads, self.m1, self.m2 = (np.zeros(total, np.float32) for _ in range(4))
        bounds = np.cumsum([0, *sizes])
        self._views = {kind: {n: buf[a:b].reshape(s) for n, a, b, s in zip(self.adapter_names, bounds[:-1],
                                                                            bounds[1:], shapes)}
                       for kind, buf in (("params", self.params), ("grads", self.grads), ("m1", self.m1),
                                         ("m2", self.m2))}
        self.optimizer = AdamW(AdamWConfig(**{k: v for k, v in spec.optimizer.items() if k != "name"}), total)
        self.step_count = 0
        self.learning_rate = 0.0
        self._load_checkpoint(str(checkpoint) if checkpoint else bundle.file(spec.checkpoint))

        # Evaluation runs the training step's forward where the bundle has it (zo_forward.onnx: the step's memory
        # passes, no gradient), else the eval graph, whose whole [heads, T, T] scores and [tokens, vocab] logits
        # cost more: SmolLM2 at 2048 tokens, 966 MB and 4.6 s against 2,768 MB and 8.4 s (docs/BENCHMARKS.md).
        forward = spec.zo.forward if spec.zo else None
        self.eval_file, self.eval_loss = (forward, spec.zo.loss) if forward else (spec.eval, spec.eval_loss)
        settings = (threads, memory_arena, memory_reuse, mmap_threshold_mb, priority_order, profile_prefix,
                    arena_regions)
        self.settings = settings  # session_options(ort, *settings): a further session of this bundle (zo.py)
        self._weights = _map_weights(bundle)  # keep: the sessions read these buffers
        try:
            # Forward-only training (zo.py) loads no gradient graph: its memory is the eval session's.
            self.session = self._session(session_options(ort, *settings), spec.training) if training else None
            self.eval_session = self._session(session_options(ort, *settings), self.eval_file) if load_eval else None
        except Exception as e:
            raise BundleError(f"onnxruntime {ort.__version__} cannot load bundle {bundle.path} "
                              f"({first_line(e)[:300]}); re-export it with this lars") from None
        self.has_eval = load_eval
        self.run_options = run_options(ort, memory_arena)
        self.loss_name = spec.loss
        self._loss = np.zeros((), np.float32)
        self.binding = self.session.io_binding() if training else None
        if training:
            self._bind_training_step()

    def _bind_training_step(self) -> None:
        ort, spec = self.ort, self.spec
        for name in self.adapter_names:
            self.binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(self._views["params"][name]))
        outputs = [o.name for o in self.session.get_outputs()]
        param_of_output = {out: param for param, out in spec.gradients.items()}
        # The loss lands in a buffer of ours too: a tensor ORT allocated outlives the run, and one in an arena region
        # keeps that whole region from being shrunk back (measured: ~1 GB held between steps at 2048 tokens).
        for name in outputs:
            if name in param_of_output:
                view = self._views["grads"][param_of_output[name]]
                self.binding.bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_numpy(view))
            elif name == self.loss_name:
                self.binding.bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_numpy(self._loss))
            else:  # logits, where the training step outputs them: ORT allocates
                self.binding.bind_output(name, "cpu")

    def _session(self, options, file: str):
        """A session of `file` whose frozen initializers are the shared mapped ones (options are per session, and
        ORT refuses an initializer the graph does not have: the manifest's index says which graph reads which)."""
        for t in self._weights:
            if file in t["models"]:
                options.add_initializer(t["name"], t["value"])
        return self.ort.InferenceSession(self.bundle.file(file), options, providers=["CPUExecutionProvider"])

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def _load_checkpoint(self, path: str) -> None:
        saved = read_checkpoint(path)  # BundleError, naming the file, on anything damaged
        for name in self.adapter_names:
            if name not in saved.parameters:
                raise BundleError(f"checkpoint {path} lacks adapter tensor {name}: it belongs to another bundle")
            value, view = saved.parameters[name], self._views["params"][name]
            if value.shape != view.shape:
                raise BundleError(f"checkpoint {path} holds {name} with shape {list(value.shape)}, the bundle says "
                                  f"{list(view.shape)}: it belongs to another bundle")
            view[...] = value
        if saved.optimizer is not None:
            for kind, moments in (("m1", saved.optimizer.first_moments), ("m2", saved.optimizer.second_moments)):
                for name in self.adapter_names:
                    if name in moments:
                        self._views[kind][name][...] = moments[name]
            self.step_count = int(saved.optimizer.step)
            self.learning_rate = float(saved.optimizer.learning_rate)

    def save(self, path: str | os.PathLike) -> None:
        """ORT checkpoint with adapters and AdamW state, loadable by onnxruntime-training too."""
        copy = {kind: {n: v.copy() for n, v in views.items()} for kind, views in self._views.items()}
        write_checkpoint(str(path), OrtCheckpoint(
            parameters=copy["params"], requires_grad={n: True for n in self.adapter_names},
            optimizer=OptimizerState(step=self.step_count, learning_rate=self.learning_rate,
                                     initial_learning_rate=self.learning_rate, first_moments=copy["m1"],
                                     second_moments=copy["m2"]),
            properties={}))

    # -- steps ---------------------------------------------------------------------------------------------------
    def train_step(self, batch: Batch, lr: float, proximal: tuple[float, np.ndarray] | None = None) -> float:
        """Forward + backward + AdamW update at learning rate `lr`; returns the batch's mean token loss. A NaN/inf
        loss or gradient raises NonFiniteStep before anything is updated.

        `proximal` = (mu, anchor): FedProx's term mu/2 * ||params - anchor||^2 joins the loss' gradient (anchor is a
        flat float32 array in the order of `params`; federated/local.py passes the round's global adapter)."""
        if batch.label_tokens == 0:
            raise LarsError("a training batch has no label tokens (all prompt or padding); check --mask-prompt")
        loss = self.forward_backward(batch)
        if not np.isfinite(loss):
            raise NonFiniteStep(loss, "loss")
        if not np.isfinite(self.grads).all():
            raise NonFiniteStep(loss, "gradient")
        if proximal is not None:
            mu, anchor = proximal
            self.grads += np.float32(mu) * (self.params - anchor)
        self.step_count += 1
        self.learning_rate = float(lr)
        self.optimizer.update(self.params, self.grads, self.m1, self.m2, lr, self.step_count)
        return loss

    def forward_backward(self, batch: Batch) -> float:
        """Loss and gradients (in the gradient buffer, see `gradients`), no update."""
        if self.session is None:
            raise RuntimeError("Engine was created with training=False (no training session)")
        ids, mask, labels = batch_feeds(batch, self.vocab_size, self.max_seq_len)
        for name, value in zip(self.spec.inputs, (ids, mask, labels)):
            self.binding.bind_cpu_input(name, value)
        self.session.run_with_iobinding(self.binding, self.run_options)
        return float(self._loss)

    def eval_step(self, batch: Batch) -> float:
        if self.eval_session is None:
            raise RuntimeError("Engine was created with load_eval=False")
        ids, mask, labels = batch_feeds(batch, self.vocab_size, self.max_seq_len)
        feeds = dict(zip(self.spec.inputs, (ids, mask, labels)))
        feeds.update(self._views["params"])
        return float(self.eval_session.run([self.eval_loss], feeds, self.run_options)[0])

    # -- tensors -------------------------------------------------------------------------------------------------
    def adapter_tensors(self) -> dict[str, np.ndarray]:
        return {n: v.copy() for n, v in self._views["params"].items()}

    def gradients(self) -> dict[str, np.ndarray]:
        return {n: v.copy() for n, v in self._views["grads"].items()}

    def set_adapter_tensors(self, tensors: dict[str, np.ndarray]) -> None:
        for name, value in tensors.items():
            self._views["params"][name][...] = value

    def reset_optimizer(self) -> None:
        """Zero AdamW's moments and step count: the next update is a first one (a federated round starts so)."""
        self.m1[...] = 0
        self.m2[...] = 0
        self.step_count = 0


def _map_weights(bundle: Bundle) -> list[dict]:
    """The frozen initializers as numpy views of one read-only memory map of the weights file, wrapped as
    OrtValues (no copy), with the graphs that read each."""
    import onnxruntime as ort

    tensors = bundle.manifest.weight_tensors  # dtype, shape and length checked against each other at load
    if not tensors:
        return []
    path = bundle.file(bundle.manifest.weights.get("file", WEIGHTS))
    mapped = np.memmap(path, mode="r")
    out = []
    for t in tensors:
        if t.offset + t.length > mapped.size:
            raise BundleError(f"{path} is shorter than the manifest's index of {t.name}: the bundle is damaged, "
                              f"re-export it")
        array = np.ndarray(tuple(t.shape), dtype=np.dtype(t.dtype), buffer=mapped, offset=t.offset)
        out.append({"name": t.name, "models": t.models, "array": array,
                    "value": ort.OrtValue.ortvalue_from_numpy(array)})
    return out
