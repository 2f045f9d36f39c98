"""ORT training artifacts from the exported graph: training / eval / optimizer models + checkpoint.

Frozen base weights stay graph initializers (not checkpoint parameters). Measured reasons, see README "Where the
frozen weights live": the ORT checkpoint then holds only the adapters, so every run checkpoint (adapters + AdamW
moments) is a few MB instead of the whole model; and both graphs point at one external-data file, so the bundle
holds the weights once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from pathlib import Path

from lars_artifacts import (ATTENTION_MASK, CHECKPOINT, EVAL_MODEL, IGNORE_INDEX, INPUT_IDS, LABELS, LOGITS,
                            OPTIMIZER_MODEL, TRAINING_MODEL, TRAINING_STEP, WEIGHTS, AdamWConfig, LarsError, OrtStep,
                            WeightTensor)

log = logging.getLogger(__name__)


def _loss_block():
    from onnxruntime.training import onnxblock

    class CausalLMLoss(onnxblock.Block):
        """Mean token cross-entropy over flattened logits; labels == IGNORE_INDEX (prompt, padding) are skipped."""

        def __init__(self):
            super().__init__()
            self.ce = onnxblock.loss.CrossEntropyLoss(reduction="mean", ignore_index=IGNORE_INDEX)

        def build(self, logits_name):
            return self.ce(logits_name, LABELS)

    return CausalLMLoss()


@contextlib.contextmanager
def _quiet_stderr():
    """Send file descriptor 2 (where ORT's C++ logger writes) to a temporary file for the duration."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


FORWARD_MODEL = "forward.onnx"


def generate(model_proto, trainable: list[str], out_dir: Path, weights_dir: Path | None = None) -> None:
    """Write the four ORT artifacts to out_dir. ORT's training build runs in a child process (lars_export.ort_training
    says why); the forward graph reaches it as a file, its frozen weights in out_dir/WEIGHTS, which the child never
    loads (see _ort_training_worker.generate) and the artifacts reference as they are. The weights are moved out of
    model_proto (its inline ones; its external ones are copied from weights_dir): the caller's proto is left pointing
    at out_dir/WEIGHTS."""
    import onnx

    from . import ort_training

    out_dir = Path(out_dir)
    _move_to_external_data(model_proto, set(trainable), out_dir / WEIGHTS, weights_dir)
    forward = out_dir / FORWARD_MODEL
    onnx.save_model(model_proto, str(forward))
    try:
        ort_training.call("generate", forward, list(trainable), out_dir)
    finally:
        forward.unlink(missing_ok=True)


def _move_to_external_data(model_proto, keep: set[str], path: Path, source_dir: Path | None = None,
                           size_threshold: int = 1024) -> None:
    """Put every initializer above size_threshold, except those named in `keep` (the adapters: ORT's checkpoint takes
    their values from the graph), in the external-data file `path`: inline bytes are moved there, tensors stored in
    another file (under source_dir) are copied there. Those already in `path` stay where they are."""
    from .external_data import ExternalDataWriter, external_location

    with ExternalDataWriter(path) as weights:
        for init in model_proto.graph.initializer:
            if init.name in keep:
                continue
            where = external_location(init)
            if where is not None:
                if where[0] != path.name:
                    if source_dir is None:
                        raise LarsError(f"{init.name} is stored in {where[0]}, and no folder to read it from was given")
                    weights.copy_external(init, source_dir)
            elif init.HasField("raw_data") and len(init.raw_data) > size_threshold:
                weights.move_inline(init)


def generate_here(model_proto, trainable: list[str], out_dir: str | Path) -> None:
    """`generate` in this process, whose onnxruntime must be the training build."""
    from onnxruntime.capi import _pybind_state as C
    from onnxruntime.training import artifacts

    out_dir = Path(out_dir)
    C.set_default_logger_severity(3)
    try:
        # generate_artifacts optimises the graph in a session whose options we cannot set, and that session logs
        # every graph transformer at INFO from C++; keep its stderr out of the user's terminal.
        with _quiet_stderr():
            artifacts.generate_artifacts(
                model_proto, requires_grad=trainable, frozen_params=[], loss=_loss_block(),
                optimizer=artifacts.OptimType.AdamW, artifact_directory=str(out_dir),
                additional_output_names=[LOGITS])
    except Exception as e:  # ORT raises RuntimeError/Fail with a C++ message; say which node if it names one
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        # ORT's C++ messages start with the source location and a long signature; the reason is at the end.
        reason = first.rsplit(" was false. ", 1)[-1] if " was false. " in first else first
        raise LarsError(f"onnxruntime-training could not build the training graph: {reason[-400:]}; "
                        f"please report this model and command") from None
    for name in (TRAINING_MODEL, EVAL_MODEL, OPTIMIZER_MODEL, CHECKPOINT):
        if not (out_dir / name).is_file():
            raise LarsError(f"onnxruntime-training wrote no {name}; please report this model and command")


def rewrite_training_model(out_dir: Path, rewrite) -> list:
    """Load training_model.onnx without its external weights, let `rewrite` change it in place (it returns pass
    reports; passes never read a weight that large), save it back."""
    import onnx

    path = out_dir / TRAINING_MODEL
    model = onnx.load(str(path), load_external_data=False)
    reports = rewrite(model)
    if any(r.changed for r in reports):
        onnx.save_model(model, str(path))
    return reports


def share_weights(out_dir: Path, size_threshold: int = 1024) -> int:
    """Put every large initializer of both graphs in the one external-data file WEIGHTS; return its size in bytes.

    The forward's frozen weights are there already (generate), and both graphs point at the same bytes; what the
    training passes added inline (e.g. LARS bases) is appended. Nothing already in the file is read."""
    import onnx

    from .external_data import external_location

    for name in (TRAINING_MODEL, EVAL_MODEL):
        path = out_dir / name
        model = onnx.load(str(path), load_external_data=False)
        for init in model.graph.initializer:
            where = external_location(init)
            if where is not None and where[0] != WEIGHTS:
                raise LarsError(f"{name} stores {init.name} in {where[0]}, not {WEIGHTS}; please report this model")
        _move_to_external_data(model, set(), out_dir / WEIGHTS, size_threshold=size_threshold)
        onnx.save_model(model, str(path))
    return (out_dir / WEIGHTS).stat().st_size


def trainable_names(model_path: Path) -> list[str]:
    """Names of the trainable tensors in an ORT checkpoint (read by lars' own reader of ORT's format)."""
    from lars_artifacts.ort_checkpoint import read_checkpoint

    return [name for name, grad in read_checkpoint(model_path).requires_grad.items() if grad]


def write_training_step(out_dir: Path, trainable: list[str], strict: bool = False) -> OrtStep:
    """training_step.onnx: ORT's training graph lowered to standard ONNX (lars_export.lowering), reading the same
    external weights file; returns the manifest's "ort" model entry (file names, input/output names, AdamW)."""
    import onnx

    from . import lowering

    training = onnx.load(str(out_dir / TRAINING_MODEL), load_external_data=False)
    user_inputs = [i.name for i in training.graph.input if i.name in (INPUT_IDS, ATTENTION_MASK, LABELS)]
    report = lowering.lower_training_step(training, list(trainable), strict=strict)
    outputs = [o.name for o in training.graph.output]
    gradients = {name: f"{name}_grad" for name in trainable}
    missing = [g for g in gradients.values() if g not in outputs]
    if missing:
        raise LarsError(f"the lowered training step lacks gradient output {missing[0]}; please report this model")
    onnx.save_model(training, str(out_dir / TRAINING_STEP))
    evalm = onnx.load(str(out_dir / EVAL_MODEL), load_external_data=False)
    return OrtStep(training=TRAINING_STEP, eval=EVAL_MODEL, checkpoint=CHECKPOINT, inputs=user_inputs,
                   loss=outputs[0], eval_loss=evalm.graph.output[0].name, gradients=gradients,
                   # the AdamW generate_artifacts writes into optimizer_model.onnx (its defaults are AdamWConfig's)
                   optimizer={"name": "adamw", **AdamWConfig().to_dict()}, strict_onnx=strict,
                   lowering=report.to_dict())


def weights_index(out_dir: Path, models: list[str]) -> dict:
    """Where each external initializer of `models` lies in WEIGHTS, and which of the models read it."""
    import onnx
    from onnx import helper

    from .external_data import external_location

    tensors: dict[str, WeightTensor] = {}
    for file in models:
        model = onnx.load(str(out_dir / file), load_external_data=False)
        for init in model.graph.initializer:
            if (where := external_location(init)) is None:
                continue
            location, offset, length = where
            if location != WEIGHTS:
                raise LarsError(f"{file} stores {init.name} in {location}, not {WEIGHTS}; please report")
            entry = WeightTensor(init.name, offset, length, str(helper.tensor_dtype_to_np_dtype(init.data_type)),
                                 list(init.dims), [])
            known = tensors.setdefault(init.name, entry)
            if (known.offset, known.length) != (entry.offset, entry.length):
                raise LarsError(f"{init.name} lies at two places of {WEIGHTS}; please report this model")
            known.models.append(file)
    return {"file": WEIGHTS, "tensors": [t.to_dict() for t in tensors.values()]}
