"""lower_training_step: ORT's training graph -> one standard-ONNX training step that plain onnxruntime runs.

Two parts:
- the step's inputs and outputs: ORT's graph accumulates each gradient into a `<param>_grad.accumulation.buffer`
  input (reset by `lazy_reset_grad`); the lowered step instead outputs every `<param>_grad` (the runtime never
  accumulates across calls) after the loss and the graph's other outputs, and reads the user inputs followed by the
  trainable parameters;
- every node of an op plain onnxruntime lacks (ORT's training kernels) is replaced by standard ONNX ops, one rule
  per op (RULES). With strict=True the contrib ops plain onnxruntime does ship (FusedMatMul, QuickGelu,
  SimplifiedLayerNormalization) are expanded too, so that only ONNX-domain standard ops remain.

Every node is checked before anything changes: a node that cannot be lowered raises LarsError naming the node, its
op and why, and leaves the model as it was.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

from lars_artifacts import LarsError

from ._rule import MS, Builder, Lowering

# Contrib ops plain onnxruntime (1.31+) runs: kept unless strict.
PLAIN_ORT_CONTRIB = {(MS, "FusedMatMul"), (MS, "QuickGelu"), ("", "SimplifiedLayerNormalization")}
ACCUMULATOR = "InPlaceAccumulatorV2"


@dataclass
class LoweringReport:
    strict: bool
    lowered: dict[str, int] = field(default_factory=dict)  # op type -> nodes lowered
    nodes_before: int = 0
    nodes_after: int = 0
    user_inputs: list[str] = field(default_factory=list)
    gradients: int = 0  # <param>_grad outputs
    dropped_inputs: int = 0  # accumulation buffers and lazy_reset_grad

    def to_dict(self) -> dict:
        return asdict(self)


def runs_on_plain_ort(node, strict: bool) -> bool:
    """Whether plain onnxruntime runs the node as it is (strict: whether it is a standard ONNX op)."""
    import onnx

    domain = node.domain or ""
    if domain in ("", "ai.onnx") and onnx.defs.has(node.op_type):
        return True
    return not strict and ("" if domain == "ai.onnx" else domain, node.op_type) in PLAIN_ORT_CONTRIB


def _subgraph_nodes(node):
    from onnx import AttributeProto

    for a in node.attribute:
        graphs = [a.g] if a.type == AttributeProto.GRAPH else list(a.graphs) if a.type == AttributeProto.GRAPHS else []
        for graph in graphs:
            for inner in graph.node:
                yield inner
                yield from _subgraph_nodes(inner)


def _plan(ctx: Lowering, strict: bool) -> list:
    """The rule of each node (None: kept), in graph order; raises for a node that cannot be lowered."""
    from . import RULES

    plan = []
    for node in ctx.model.graph.node:
        for inner in _subgraph_nodes(node):
            if not runs_on_plain_ort(inner, strict):
                ctx.fail(node, f"its subgraph holds {inner.domain}:{inner.op_type} (subgraphs are not lowered)")
        rule = next((r for r in RULES if r.matches(node, strict)), None)
        if rule is not None:
            why = rule.check(node, ctx)
            if why:
                ctx.fail(node, why)
        elif not runs_on_plain_ort(node, strict):
            ctx.fail(node, "no lowering rule for this op" + (" (strict: only standard ONNX ops may remain)" if strict
                                                              else ", and it is not one plain onnxruntime runs"))
        plan.append(rule)
    return plan


def _apply(ctx: Lowering, plan: list) -> Counter:
    graph = ctx.model.graph
    nodes, lowered = [], Counter()
    for node, rule in zip(list(graph.node), plan):
        if rule is None:
            nodes.append(node)
            continue
        b = Builder(ctx, node)
        rule.replace(node, b)
        nodes.extend(b.nodes)
        lowered[node.op_type] += 1
    graph.ClearField("node")
    graph.node.extend(nodes)
    return lowered


def _clean_opsets(model) -> None:
    used = {n.domain or "" for n in model.graph.node}
    keep = [o for o in model.opset_import if (o.domain or "") in ("", "ai.onnx") or o.domain in used]
    del model.opset_import[:]
    model.opset_import.extend(keep)


def lower_ops(model, strict: bool = False) -> dict[str, int]:
    """Lower every node of `model` (any graph, inputs and outputs untouched) in place; op type -> nodes lowered."""
    ctx = Lowering(model)
    lowered = _apply(ctx, _plan(ctx, strict))
    _clean_opsets(model)
    return dict(lowered)


def lower_training_step(model, trainable: list[str], strict: bool = False) -> LoweringReport:
    """Rewrite ORT's training_model.onnx (`model`, loaded with or without its external data: initializers are not
    touched) in place into a training step plain onnxruntime runs: inputs = the user inputs, then `trainable` in
    that order; outputs = the loss, the graph's other non-gradient outputs, then `<param>_grad` per trainable
    parameter. Raises LarsError (one line) for a graph or node it cannot lower."""
    from onnx import TensorProto, ValueInfoProto, helper

    graph = model.graph
    ctx = Lowering(model)
    report = LoweringReport(strict=strict, nodes_before=len(graph.node))

    # -- inputs and outputs (checked, not yet changed) -----------------------------------------------------------
    inputs = {i.name: i for i in graph.input}
    if len(set(trainable)) != len(trainable):
        raise LarsError("lower_training_step: `trainable` names a parameter twice")
    for name in trainable:
        if name not in inputs:
            raise LarsError(f"the training graph has no input {name!r} (a trainable parameter)")
    accumulators = {n.input[0]: n for n in graph.node if n.op_type == ACCUMULATOR and (n.domain or "") == MS}
    buffers = {f"{p}_grad.accumulation.buffer": p for p in trainable}
    for buffer in accumulators:
        if buffer not in buffers:
            raise LarsError(f"the training graph accumulates {buffer!r}, the gradient of a parameter not in "
                            f"`trainable`")
    grads = {}
    for p in trainable:
        acc = accumulators.get(f"{p}_grad.accumulation.buffer")
        grad = acc.input[1] if acc is not None and len(acc.input) > 1 else None
        if grad is None and f"{p}_grad" in ctx.producer:
            grad = f"{p}_grad"
        if not grad:
            raise LarsError(f"the training graph computes no gradient of {p!r}")
        if grad != f"{p}_grad" and f"{p}_grad" in ctx.taken:
            raise LarsError(f"the training graph's gradient of {p!r} is {grad!r}, and {p}_grad names another tensor")
        grads[p] = grad
    dropped = set(accumulators)
    dropped.update(n.input[2] for n in accumulators.values() if len(n.input) > 2 and n.input[2])
    for name in sorted(dropped):
        readers = [n for n in ctx.consumers.get(name, []) if n.op_type != ACCUMULATOR]
        if readers:
            raise LarsError(f"node {readers[0].name!r} ({readers[0].op_type}) reads {name!r}, an input of ORT's "
                            f"gradient accumulation the lowered step drops")
    accumulated = {o for n in accumulators.values() for o in n.output if o}
    if not graph.output or graph.output[0].name in accumulated:
        raise LarsError("the training graph's first output is not its loss")
    outputs = [o for o in graph.output if o.name not in accumulated]
    for p in trainable:
        info = ValueInfoProto()
        info.name = f"{p}_grad"
        info.type.CopyFrom(inputs[p].type)
        info.type.tensor_type.elem_type = TensorProto.FLOAT
        outputs.append(info)
    ctx.graph_outputs = {o.name for o in outputs}

    # -- the ops (checked, then changed) -------------------------------------------------------------------------
    plan = _plan(ctx, strict)
    report.lowered = dict(_apply(ctx, plan))
    for p, grad in grads.items():
        if grad != f"{p}_grad":
            graph.node.append(helper.make_node("Identity", [grad], [f"{p}_grad"],
                                               name=ctx.fresh_node(f"lowering/{p}_grad")))
    user = [i for i in graph.input if i.name not in buffers and i.name not in dropped and i.name not in grads]
    new_inputs = user + [inputs[p] for p in trainable]
    del graph.input[:]
    graph.input.extend(new_inputs)
    del graph.output[:]
    graph.output.extend(outputs)

    # -- tidy: value_info of tensors gone or now graph inputs/outputs, unused opset imports -----------------------
    produced = {o for n in graph.node for o in n.output if o}
    io = {i.name for i in graph.input} | {o.name for o in graph.output}
    keep = [v for v in graph.value_info if v.name in produced and v.name not in io]
    del graph.value_info[:]
    graph.value_info.extend(keep)
    _clean_opsets(model)

    report.nodes_after = len(graph.node)
    report.user_inputs = [i.name for i in user]
    report.gradients = len(trainable)
    report.dropped_inputs = len(dropped)
    return report
