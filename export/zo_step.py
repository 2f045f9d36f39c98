"""The graphs forward-only training runs (lars_ort.zo): zo_forward.onnx (one adapter setting per run, the lowest
memory) and zo_step.onnx (P adapter settings in one run).

zo_forward.onnx is the training step pruned to its loss (forward_of): the backprop step's forward, memory passes
included, and no gradient.

Zeroth-order training (P-RGE) scores the loss at several perturbed copies of the adapters per step. This graph is
the eval graph with every adapter input given a leading axis of P settings ([P, out, in]), the batch repeated P
times along its batch axis (the runtime tiles it), and one mean token loss per setting as its output ([P]): sample
rows p*b .. (p+1)*b - 1 run through adapter setting p. P = 1 is the plain eval forward, so one graph serves the
sequential (lowest memory) and the batched (P-RGE's parallel loops) estimators.

What changes, per adapter tensor W [out, in] (as the exporter traces LoRA: h @ Transpose(W)):
    Transpose(W, perm [1, 0])          -> Transpose(W, perm [0, 2, 1])            [P, in, out]
    MatMul(h [N, T, in], W^T)          -> Reshape(MatMul(Reshape(h, [P, -1, in]), W^T), [N, T, -1])
and the loss: SoftmaxCrossEntropyLoss(reduction mean) -> reduction none, summed per setting and divided by the
setting's label count. Its log_prob output, which nothing reads, is dropped: that is a second [tokens, vocab]
float32 tensor the eval graph's loss kernel writes (400 MB at 2048 tokens on SmolLM2), so this forward peaks lower
than the eval graph's.
"""

from __future__ import annotations

from pathlib import Path

from lars_artifacts import EVAL_MODEL, IGNORE_INDEX, LABELS, ZO_FORWARD, ZO_STEP, LarsError, ZoModels

from .passes._base import attr, consumers, gate_all, gate_of, gate_waits_for, producers

LOSSES = "zo_losses"            # output: [P] mean token loss per adapter setting
SETTINGS = "zo_settings"        # the symbolic leading axis of every adapter input


class ZoStepUnsupported(LarsError):
    """The eval graph does not have the shape this builder rewrites (the bundle then has no zo_step.onnx: forward-only
    training runs one setting per forward, through zo_forward.onnx)."""


def build_zo_step(model, adapter_names: list[str]):
    """Rewrite `model` (the eval ModelProto, weights external) in place into the zo step; returns it."""
    from onnx import TensorProto, helper, numpy_helper

    import numpy as np

    graph = model.graph
    readers_of = consumers(model)
    inputs = {i.name: i for i in graph.input}
    missing = [n for n in adapter_names if n not in inputs]
    if missing:
        raise ZoStepUnsupported(f"the eval graph does not take adapter tensor {missing[0]} as an input")

    # the first output of each MatMul -> the nodes that replace it, in order (keyed by name: protobuf wrappers'
    # ids are not stable)
    new_nodes: dict[str, list] = {}
    inits = [numpy_helper.from_array(np.array([-1], np.int64), "zo/minus_one")]
    first = adapter_names[0]
    head = [helper.make_node("Shape", [first], ["zo/settings"], name="zo/settings", start=0, end=1)]
    for k, name in enumerate(adapter_names):
        dims = inputs[name].type.tensor_type.shape.dim
        if len(dims) != 2 or not all(d.HasField("dim_value") for d in dims):
            raise ZoStepUnsupported(f"adapter input {name} is not a 2-D tensor of fixed shape")
        width = dims[1].dim_value
        readers = readers_of.get(name, [])
        if len(readers) != 1 or readers[0].op_type != "Transpose" or list(attr(readers[0], "perm", [])) != [1, 0]:
            raise ZoStepUnsupported(f"adapter tensor {name} is not read by one Transpose(perm [1, 0])")
        transpose = readers[0]
        products = readers_of.get(transpose.output[0], [])
        if len(products) != 1 or products[0].op_type != "MatMul" or products[0].input[1] != transpose.output[0]:
            raise ZoStepUnsupported(f"the transposed adapter tensor {name} is not the right operand of one MatMul")
        matmul = products[0]
        _set_attr(transpose, "perm", [0, 2, 1])
        settings = type(dims[0])()
        settings.dim_param = SETTINGS
        dims.insert(0, settings)
        h, y, p = matmul.input[0], matmul.output[0], f"zo/{k}"
        inits.append(numpy_helper.from_array(np.array([width], np.int64), f"{p}/width"))
        new_nodes[matmul.output[0]] = [
            helper.make_node("Concat", ["zo/settings", "zo/minus_one", f"{p}/width"], [f"{p}/shape_in"], axis=0),
            helper.make_node("Reshape", [h, f"{p}/shape_in"], [f"{p}/h"]),
            helper.make_node("MatMul", [f"{p}/h", transpose.output[0]], [f"{p}/y"]),
            helper.make_node("Shape", [h], [f"{p}/lead"], start=0, end=-1),
            helper.make_node("Concat", [f"{p}/lead", "zo/minus_one"], [f"{p}/shape_out"], axis=0),
            helper.make_node("Reshape", [f"{p}/y", f"{p}/shape_out"], [y]),
        ]

    loss_name = graph.output[0].name
    losses = [n for n in graph.node if n.op_type == "SoftmaxCrossEntropyLoss" and n.output[0] == loss_name]
    if len(losses) != 1:
        raise ZoStepUnsupported("the eval graph's loss is not one SoftmaxCrossEntropyLoss")
    loss = losses[0]
    if loss.input[1] != LABELS or attr(loss, "reduction", b"mean") != b"mean" or len(loss.input) > 2:
        raise ZoStepUnsupported("the eval graph's loss is not a mean over the labels input without weights")
    ignore = attr(loss, "ignore_index")
    if ignore != IGNORE_INDEX:
        raise ZoStepUnsupported(f"the eval graph's loss ignores label {ignore}, not {IGNORE_INDEX}")
    _set_attr(loss, "reduction", "none")
    del loss.output[1:]  # log_prob: nobody reads it, and it is a [tokens, vocab] float32 tensor
    per_token = loss_name
    inits.append(numpy_helper.from_array(np.array([1], np.int64), "zo/axis1"))
    inits.append(numpy_helper.from_array(np.array(IGNORE_INDEX, np.int64), "zo/ignore"))
    tail = [
        helper.make_node("Concat", ["zo/settings", "zo/minus_one"], ["zo/by_setting"], axis=0),
        helper.make_node("Reshape", [per_token, "zo/by_setting"], ["zo/token_losses"]),
        helper.make_node("ReduceSum", ["zo/token_losses", "zo/axis1"], ["zo/loss_sums"], keepdims=0),
        helper.make_node("Equal", [LABELS, "zo/ignore"], ["zo/ignored"]),
        helper.make_node("Not", ["zo/ignored"], ["zo/counted"]),
        helper.make_node("Cast", ["zo/counted"], ["zo/counted_f"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["zo/counted_f", "zo/by_setting"], ["zo/counted_by_setting"]),
        helper.make_node("ReduceSum", ["zo/counted_by_setting", "zo/axis1"], ["zo/counts"], keepdims=0),
        helper.make_node("Div", ["zo/loss_sums", "zo/counts"], [LOSSES]),
    ]

    nodes = list(head)
    for node in graph.node:
        nodes.extend(new_nodes.get(node.output[0], [node]))
        if node.output[0] == loss_name:
            nodes.extend(tail)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(inits)
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(LOSSES, TensorProto.FLOAT, [SETTINGS]))
    del graph.value_info[:]  # shapes of the rewritten tensors changed; ORT infers them again
    return model


def forward_of(model, output: str):
    """Prune a training graph (ModelProto, in place) to the nodes, inputs and initializers `output` depends on: its
    forward, with every memory pass' forward part (attention in causal row chunks, the chunked loss) and none of
    the backward.

    A gate (passes._base.gate_all) only orders its tensor after others: where those are not themselves needed (the
    chunked loss' forward gradients, which order its chunks in the training step), the gate waits instead for the
    nearest tensors they were computed from that the forward does compute (a chunk's log-probabilities), rather
    than pulling that work in."""
    from onnx import helper

    producer = producers(model)
    gates = {}  # gated tensor -> (its gate's axes input, the tensors the gate waits for)
    for node in model.graph.node:
        opener = gate_of(producer, node.output[0])
        if opener is not None:
            gates[node.output[0]] = (node.input[1], gate_waits_for(producer, opener))

    def add_ancestors(needed: set[str], stack: list[str]) -> None:
        while stack:  # what these depend on; a gated tensor through its data input only
            name = stack.pop()
            node = producer.get(name)
            for i in (node.input[:1] if name in gates else node.input) if node is not None else ():
                if i and i not in needed:
                    needed.add(i)
                    stack.append(i)

    needed = {output}
    add_ancestors(needed, [output])
    open_gates = {g for g in gates if g in needed and gates[g][1] <= needed}
    axes = [gates[g][0] for g in open_gates]  # an open gate's own nodes (Size, Mul) stay
    needed |= set(axes)
    add_ancestors(needed, axes)
    graph = model.graph
    made = {o for node in graph.node if any(o in needed for o in node.output) for o in node.output}
    constant = {i.name for i in graph.initializer} | {i.name for i in graph.input}
    nodes = []
    for node in graph.node:
        if not any(o in needed for o in node.output):
            continue
        if node.output[0] in gates and node.output[0] not in open_gates:  # re-gate on what the forward makes
            afters = _nearest(producer, gates[node.output[0]][1], made - constant)
            gated, regate = node.input[0], []
            if afters:  # else what it waited for comes from the inputs alone: nothing to order
                regate, (gated,) = gate_all(model, f"{node.name}/forward", [gated], sorted(afters))
            nodes += [*regate, helper.make_node("Identity", [gated], [node.output[0]], name=node.name)]
            continue
        nodes.append(node)
    needed |= {i for node in nodes for i in node.input}  # the new gates' inputs too
    inits = [i for i in graph.initializer if i.name in needed]
    inputs = [i for i in graph.input if i.name in needed]
    outputs = [o for o in graph.output if o.name == output]
    for field, values in ((graph.node, nodes), (graph.initializer, inits), (graph.input, inputs),
                          (graph.output, outputs)):
        del field[:]
        field.extend(values)
    del graph.value_info[:]
    return model


def _nearest(producer: dict, tensors: set[str], available: set[str]) -> set[str]:
    """The available tensors closest above `tensors` (each path upward stops at the first one)."""
    found, seen, stack = set(), set(), list(tensors)
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in available:
            found.add(name)
        elif name in producer:
            stack.extend(i for i in producer[name].input if i)
    return found


def write_zo_step(out_dir: Path, adapter_names: list[str], training_step: str, loss: str) -> ZoModels:
    """The forward-only models beside the others (same external weights); returns the manifest's "zo" entry:
      forward   ZO_FORWARD: the training step (`training_step`, its loss output `loss`) pruned to its loss, so one
                adapter setting per run has the backprop step's forward memory (row-chunked attention, chunked
                loss), not the eval graph's (whole [heads, T, T] scores and [tokens, vocab] logits)
      file      ZO_STEP: P settings per run (build_zo_step of the eval graph), or None and the reason it could not
                be built (forward-only training then runs one setting at a time)."""
    import onnx

    forward = forward_of(onnx.load(str(out_dir / training_step), load_external_data=False), loss)
    onnx.save_model(forward, str(out_dir / ZO_FORWARD))
    model = onnx.load(str(out_dir / EVAL_MODEL), load_external_data=False)
    try:
        build_zo_step(model, adapter_names)
    except ZoStepUnsupported as e:
        return ZoModels(forward=ZO_FORWARD, loss=loss, file=None, reason=str(e))
    onnx.save_model(model, str(out_dir / ZO_STEP))
    return ZoModels(forward=ZO_FORWARD, loss=loss, file=ZO_STEP, losses=LOSSES, settings_axis=SETTINGS)


def _set_attr(node, name: str, value) -> None:
    from onnx import helper

    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend([*kept, helper.make_attribute(name, value)])
