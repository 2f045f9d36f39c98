"""The machinery every pass shares: its context, its report, how it runs, and the names and op sets the graph walks
agree on (the walks themselves, on onnx_ir, are in _ir.py)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable


@dataclass
class PassContext:
    trainable: set[str]  # initializer names ORT will train (the adapters); passes must keep them as they are
    # LARS: lora_A parameter name -> projection basis P [d, k] (float32); empty for exact LoRA.
    lars_bases: dict = field(default_factory=dict)
    loss_chunks: int = 0  # chunked_loss: row chunks of the vocabulary projection + cross-entropy (< 2: whole)
    attention_chunks: int = 0  # attention_chunks: groups of heads computed one at a time (< 2: whole)
    attention_heads: int = 0  # the model's attention heads (attention_chunks splits them)
    attention_row_chunks: int = 0  # attention_chunks: chunks of each group's query rows, one at a time (< 2: whole)
    # attention_chunks: the attention mask is causal and query i is key i (a decoder LM's training step), so a
    # chunk of query rows skips the keys after its last row
    causal_attention: bool = False
    quantize: str = "none"  # quantize_frozen: storage of the frozen matrices (none, int8, int4)
    quantize_block: int = 32  # quantize_frozen: INT4 block size along the reduction axis
    # where the graph's external-data initializers (the frozen weights, never loaded whole) are read from; None:
    # every initializer a pass reads is inline
    weights_dir: str | None = None


@dataclass
class PassReport:
    name: str
    changed: int = 0
    skipped: list[str] = field(default_factory=list)  # one line each: what was left alone and why
    bytes_freed: int = 0                               # what the pass expects to free, counted per `freed_per`:
    freed_per: str = ""                                # "token" (activations of each token), "step" (a step's
    #                                                    transient at its peak) or "bundle" (weights held at load)
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GraphPass:
    name: str
    stage: str  # "forward" | "training"
    apply: Callable  # (onnx.ModelProto, or an onnx_ir.Model if `ir`, PassContext) -> PassReport
    switch: str | tuple | None = None  # the ExportConfig field(s) that turn the pass on (None: always runs)
    ir: bool = False  # written on onnx_ir (passes/_ir.py): run_passes converts the graph around it

    def run(self, model, context: PassContext) -> PassReport:
        """Apply the pass to a ModelProto, in place (through onnx_ir if the pass is written on it)."""
        if not self.ir:
            return self.apply(model, context)
        from . import _ir

        return _ir.edit_in_place(model, lambda ir_model: self.apply(ir_model, context), context.weights_dir)


PASS_WEIGHTS = "passes.onnx_data"  # where forward passes put the large tensors they make (under weights_dir)

# Ops whose only use of a tensor is its shape: ORT's priority-based order runs them as soon as the tensor exists,
# so a backward Shape does not keep a forward tensor alive.
SHAPE_OPS = {"Shape", "Size"}

# Ops whose output is a view of their input in ORT (same buffer): reading the view keeps the input alive.
VIEW_OPS = {"Reshape", "Squeeze", "Unsqueeze", "Identity", "Flatten"}

GATE_NO_AXES = "passes.gate.no_axes"  # int64 [0]: Size(t) · [] is an empty axes list (one shared initializer)
