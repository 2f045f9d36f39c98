"""The machinery every pass shares: its context, its report, how it runs; and the protobuf walks and gates that
zo_step, the tools and the tests use on ModelProtos (the passes' own, on onnx_ir, are in _ir.py)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np


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

        ir_model = _ir.to_ir(model, context.weights_dir)
        report = self.apply(ir_model, context)
        _ir.into_proto(ir_model, model)
        return report


def attr(node, name: str, default=None):
    """A node attribute's value (strings as bytes, as onnx gives them), or `default` if the node lacks it."""
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


PASS_WEIGHTS = "passes.onnx_data"  # where forward passes put the large tensors they make (under weights_dir)


def shared_initializer(model, name: str, value: np.ndarray) -> str:
    """`name`, added to the model's initializers holding `value` unless a pass already added it (constants that
    many nodes share: gate floors, split sizes, row bounds)."""
    from onnx import numpy_helper

    if not any(i.name == name for i in model.graph.initializer):
        model.graph.initializer.append(numpy_helper.from_array(value, name))
    return name


def producers(model) -> dict:
    return {o: n for n in model.graph.node for o in n.output}


def consumers(model) -> dict[str, list]:
    out: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def descendants(tensors, cons: dict, within: set | None = None, stop: set | None = None) -> dict:
    """The nodes that read `tensors`, transitively (id -> node): the walk follows consumers, enters only nodes whose
    id is in `within` (None: any) and does not walk past the tensors in `stop`."""
    found, stack = {}, list(tensors)
    while stack:
        for node in cons.get(stack.pop(), []):
            if id(node) in found or (within is not None and id(node) not in within):
                continue
            found[id(node)] = node
            stack.extend(t for t in node.output if not stop or t not in stop)
    return found


# Ops whose only use of a tensor is its shape: ORT's priority-based order runs them as soon as the tensor exists,
# so a backward Shape does not keep a forward tensor alive.
SHAPE_OPS = {"Shape", "Size"}


def backward_nodes(model) -> list:
    """Nodes of an ORT training graph that run after the turn: everything downstream of the loss gradient.

    ORT seeds the backward with an initializer named "<loss>_grad". Nodes that neither the forward outputs need nor
    depend on that seed (Shape nodes, the LARS projection x·P) can run during the forward and are not counted here.
    The training graph is not stored in topological order, so this walks consumers from the seed.
    """
    seen = descendants([f"{model.graph.output[0].name}_grad"], consumers(model))
    return [n for n in model.graph.node if id(n) in seen]


# Ops whose output is a view of their input in ORT (same buffer): reading the view keeps the input alive.
VIEW_OPS = {"Reshape", "Squeeze", "Unsqueeze", "Identity", "Flatten"}


def view_chain(name: str, producer: dict, stop: set | None = None) -> list[str]:
    """[name, its view source, ..., the tensor that owns the buffer]; `stop` holds ids of nodes not to walk into."""
    chain = [name]
    node = producer.get(name)
    while node is not None and node.op_type in VIEW_OPS and (stop is None or id(node) not in stop):
        chain.append(node.input[0])
        node = producer.get(node.input[0])
    return chain


def saved_for_backward(model) -> dict[str, list]:
    """Tensor made before the turn -> the backward nodes that read it (or a view of it), ignoring readers that only
    take its shape. These are the tensors alive at the turn from forward to backward."""
    backward = backward_nodes(model)
    backward_ids = {id(n) for n in backward}
    producer = producers(model)
    before_turn = {o for n in model.graph.node if id(n) not in backward_ids for o in n.output}
    out: dict[str, list] = {}
    for node in backward:
        if node.op_type in SHAPE_OPS:
            continue
        for name in node.input:
            if name in before_turn:
                out.setdefault(view_chain(name, producer, backward_ids)[-1], []).append(node)
    return out


GATE_NO_AXES = "passes.gate.no_axes"  # int64 [0]: Size(t) · [] is an empty axes list (one shared initializer)


def gate_after(model, prefix: str, tensor: str, after: str | list[str]) -> tuple[list, str]:
    """Nodes computing Unsqueeze(tensor, axes=Size(after) · []), and its name: the same tensor (any dtype; no axis
    is inserted), available only once `after` exists. ORT's Unsqueeze aliases its input: the gate copies nothing.

    Recompute passes use it so ORT cannot schedule a recomputation before the backward reaches it, and so its
    common-subexpression elimination cannot merge the copy back into the forward (the gated input differs). It
    also keeps ORT's constant folding off a computation on initializers (quantized weights): the axes are not
    constant. `after` must have a dynamic shape: ORT constant-folds Size of a static one, which would drop the
    dependency.
    """
    nodes, (gated,) = gate_all(model, prefix, [tensor], after)
    return nodes, gated


def gate_of(prod: dict, tensor: str):
    """The node that opens the gate which produced `tensor` (gate_all's: its input 0 is the Size, or the sum of the
    Sizes, of what the gate waits for), or None if `tensor` is not gated."""
    alias = prod.get(tensor)
    if alias is None or alias.op_type != "Unsqueeze" or len(alias.input) < 2:
        return None
    axes = prod.get(alias.input[1])
    return axes if axes is not None and axes.op_type == "Mul" and axes.input[1] == GATE_NO_AXES else None


def gate_waits_for(prod: dict, opener) -> set[str]:
    """The tensors a gate (gate_of's opener) waits for: the inputs of the Size nodes above it."""
    afters, stack = set(), [opener.input[0]]
    while stack:
        node = prod.get(stack.pop())
        if node is None:
            continue
        if node.op_type == "Size":
            afters.add(node.input[0])
        else:
            stack.extend(i for i in node.input if i in prod)
    return afters


def gate_all(model, prefix: str, tensors: list[str], after: str | list[str]) -> tuple[list, list[str]]:
    """gate_after for several tensors on one condition: nodes, and the gated names in the order given. `after` may
    be several tensors: the gate then opens once all of them exist."""
    from onnx import helper

    shared_initializer(model, GATE_NO_AXES, np.zeros(0, np.int64))
    afters = [after] if isinstance(after, str) else list(after)
    if len(afters) == 1:
        nodes = [helper.make_node("Size", afters, [f"{prefix}/gate_size"], name=f"{prefix}/GateSize")]
    else:
        sizes = [f"{prefix}/gate_size{k}" for k in range(len(afters))]
        nodes = [helper.make_node("Size", [t], [size], name=f"{prefix}/GateSize{k}")
                 for k, (t, size) in enumerate(zip(afters, sizes))]
        total = sizes[0]  # Add, not Sum: Sum takes no int64
        for k, size in enumerate(sizes[1:], 1):
            out = f"{prefix}/gate_size" if k == len(sizes) - 1 else f"{prefix}/gate_sizes{k}"
            nodes.append(helper.make_node("Add", [total, size], [out], name=f"{prefix}/GateSizes{k}"))
            total = out
    nodes.append(helper.make_node("Mul", [f"{prefix}/gate_size", GATE_NO_AXES], [f"{prefix}/gate_axes"],
                                  name=f"{prefix}/GateOpen"))
    gated = [f"{prefix}/gated" if len(tensors) == 1 else f"{prefix}/gated{k}" for k in range(len(tensors))]
    nodes += [helper.make_node("Unsqueeze", [t, f"{prefix}/gate_axes"], [g], name=f"{prefix}/Gate{k if k else ''}")
              for k, (t, g) in enumerate(zip(tensors, gated))]
    return nodes, gated
