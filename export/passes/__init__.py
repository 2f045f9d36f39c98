"""Graph passes: each rewrite is one file with one registered pass and a sibling test.

A pass runs at a stage:
- "forward": on the exported forward graph, before ORT builds the gradient graph;
- "training": on ORT's training_model.onnx, after generate_artifacts (the LARS rewrite lives there).
Every pass returns a PassReport (what it changed, what it skipped and why, bytes it expects to free); the reports
go into the bundle manifest under "passes".
"""

from __future__ import annotations

from . import _ir
from ._base import GraphPass, PassContext, PassReport
from .attention_chunks import ATTENTION_CHUNKS
from .attention_recompute import ATTENTION_RECOMPUTE
from .cheap_recompute import CHEAP_RECOMPUTE
from .chunked_loss import CHUNKED_LOSS
from .dequantize_at_use import DEQUANTIZE_AT_USE
from .dequantize_in_slices import DEQUANTIZE_IN_SLICES
from .lars_projection import LARS_PROJECTION
from .layer_recompute import LAYER_RECOMPUTE
from .pretranspose_frozen import PRETRANSPOSE_FROZEN
from .quantize_frozen import QUANTIZE_FROZEN

# The ordered list of passes. Adding a pass: a file in this folder, its test, and one line here.
PASSES: list[GraphPass] = [
    PRETRANSPOSE_FROZEN,
    QUANTIZE_FROZEN,
    LARS_PROJECTION,
    ATTENTION_CHUNKS,  # before attention_recompute, which then finds no probabilities left to recompute
    ATTENTION_RECOMPUTE,
    CHUNKED_LOSS,
    LAYER_RECOMPUTE,
    CHEAP_RECOMPUTE,  # after layer_recompute: what it leaves saved (the blocks it copies are made in the backward)
    DEQUANTIZE_IN_SLICES,  # after the passes that add readers of the output projection, before dequantize_at_use
    DEQUANTIZE_AT_USE,  # last: it gives every reader the other passes added its own dequantized copy
]


def enabled_passes(config) -> set[str]:
    """Names of the passes an ExportConfig turns on."""
    def on(switch) -> bool:
        fields = (switch,) if isinstance(switch, str) else switch
        return any(getattr(config, f) not in (False, 0, None, "none") for f in fields)

    return {p.name for p in PASSES if p.switch is None or on(p.switch)}


def run_passes(model, context: PassContext, stage: str, enabled: set[str] | None = None) -> list[PassReport]:
    """Run the stage's enabled passes on `model` (a ModelProto, changed in place), in PASSES order; passes written on
    onnx_ir get the graph converted once for each run of consecutive ones."""
    reports, ir_model = [], None
    for graph_pass in PASSES:
        if graph_pass.stage != stage or (enabled is not None and graph_pass.name not in enabled):
            continue
        if graph_pass.ir and ir_model is None:
            ir_model = _ir.to_ir(model, context.weights_dir)
        elif not graph_pass.ir and ir_model is not None:
            _ir.into_proto(ir_model, model)
            ir_model = None
        reports.append(graph_pass.apply(model if ir_model is None else ir_model, context))
    if ir_model is not None:
        _ir.into_proto(ir_model, model)
    return reports


__all__ = ["PASSES", "GraphPass", "PassContext", "PassReport", "enabled_passes", "run_passes"]
