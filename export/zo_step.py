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

from .passes import _ir

LOSSES = "zo_losses"            # output: [P] mean token loss per adapter setting
SETTINGS = "zo_settings"        # the symbolic leading axis of every adapter input


class ZoStepUnsupported(LarsError):
    """The eval graph does not have the shape this builder rewrites (the bundle then has no zo_step.onnx: forward-only
    training runs one setting per forward, through zo_forward.onnx)."""


def build_zo_step(model, adapter_names: list[str]):
    """Rewrite `model` (the eval ModelProto, weights external) in place into the zo step; returns it."""
    _ir.edit_in_place(model, lambda ir_model: _zo_step(ir_model.graph, adapter_names))
    del model.graph.value_info[:]  # shapes of the rewritten values changed; ORT infers them again
    return model


def _zo_step(graph, adapter_names: list[str]) -> None:
    import onnx_ir as ir

    import numpy as np

    inputs = {v.name: v for v in graph.inputs}
    matmuls = []  # (adapter input, its Transpose, the MatMul reading it), all checked before anything changes
    for name in adapter_names:
        adapter = inputs.get(name)
        if adapter is None:
            raise ZoStepUnsupported(f"the eval graph does not take adapter tensor {name} as an input")
        if adapter.shape is None or len(adapter.shape) != 2 or not adapter.shape.is_static():
            raise ZoStepUnsupported(f"adapter input {name} is not a 2-D tensor of fixed shape")
        readers = [use.node for use in adapter.uses()]
        if (len(readers) != 1 or readers[0].op_type != "Transpose"
                or list(readers[0].attributes.get_ints("perm", [])) != [1, 0]):
            raise ZoStepUnsupported(f"adapter tensor {name} is not read by one Transpose(perm [1, 0])")
        products = list(readers[0].outputs[0].uses())
        if len(products) != 1 or products[0].node.op_type != "MatMul" or products[0].idx != 1:
            raise ZoStepUnsupported(f"the transposed adapter tensor {name} is not the right operand of one MatMul")
        matmuls.append((adapter, readers[0], products[0].node))
    loss_name = graph.outputs[0].name
    losses = [n for n in graph if n.op_type == "SoftmaxCrossEntropyLoss" and n.outputs[0].name == loss_name]
    if len(losses) != 1:
        raise ZoStepUnsupported("the eval graph's loss is not one SoftmaxCrossEntropyLoss")
    loss = losses[0]
    if (len(loss.inputs) > 2 or loss.inputs[1].name != LABELS
            or loss.attributes.get_string("reduction", "mean") != "mean"):
        raise ZoStepUnsupported("the eval graph's loss is not a mean over the labels input without weights")
    ignore = loss.attributes.get_int("ignore_index")
    if ignore != IGNORE_INDEX:
        raise ZoStepUnsupported(f"the eval graph's loss ignores label {ignore}, not {IGNORE_INDEX}")

    constants = {"zo/minus_one": np.array([-1], np.int64), "zo/axis1": np.array([1], np.int64),
                 "zo/ignore": np.array(IGNORE_INDEX, np.int64)}
    constants.update((f"zo/{k}/width", np.array([adapter.shape[1]], np.int64))
                     for k, (adapter, _, _) in enumerate(matmuls))
    nodes = _ir.Nodes(constants, graph)
    for value in nodes.constants:
        graph.register_initializer(value)
    graph.insert_before(graph.node(0), [nodes("Shape", [adapter_names[0]], ["zo/settings"], "zo/settings",
                                              start=0, end=1)])
    for k, (adapter, transpose, matmul) in enumerate(matmuls):
        transpose.attributes["perm"] = ir.AttrInt64s("perm", [0, 2, 1])
        adapter.shape = ir.Shape([SETTINGS, *adapter.shape.dims])
        # h [N, T, in] -> [P, N·T/P, in] · W^T [P, in, out] -> [N, T, out]: each setting's rows through its adapter
        h, y, p = matmul.inputs[0], matmul.outputs[0], f"zo/{k}"
        batched = [
            nodes("Concat", ["zo/settings", "zo/minus_one", f"{p}/width"], [f"{p}/shape_in"], f"{p}/ShapeIn", axis=0),
            nodes("Reshape", [h, f"{p}/shape_in"], [f"{p}/h"], f"{p}/ReshapeIn"),
            nodes("MatMul", [f"{p}/h", transpose.outputs[0]], [f"{p}/y"], f"{p}/MatMul"),
            nodes("Shape", [h], [f"{p}/lead"], f"{p}/Lead", start=0, end=-1),
            nodes("Concat", [f"{p}/lead", "zo/minus_one"], [f"{p}/shape_out"], f"{p}/ShapeOut", axis=0),
            nodes("Reshape", [f"{p}/y", f"{p}/shape_out"], [f"{p}/out"], f"{p}/ReshapeOut"),
        ]
        graph.insert_before(matmul, batched)
        y.replace_all_uses_with(batched[-1].outputs[0])
        graph.remove(matmul, safe=True)
        batched[-1].outputs[0].name = y.name  # the graph's readers keep the name they knew

    loss.attributes.pop("reduction", None)
    loss.attributes["reduction"] = ir.AttrString("reduction", "none")
    graph.outputs.clear()  # the per-token losses are no output any more: LOSSES, one per setting, is
    loss.resize_outputs(1)  # log_prob: nobody reads it, and it is a [tokens, vocab] float32 tensor
    tail = [
        nodes("Concat", ["zo/settings", "zo/minus_one"], ["zo/by_setting"], "zo/BySetting", axis=0),
        nodes("Reshape", [loss.outputs[0], "zo/by_setting"], ["zo/token_losses"], "zo/TokenLosses"),
        nodes("ReduceSum", ["zo/token_losses", "zo/axis1"], ["zo/loss_sums"], "zo/LossSums", keepdims=0),
        nodes("Equal", [LABELS, "zo/ignore"], ["zo/ignored"], "zo/Ignored"),
        nodes("Not", ["zo/ignored"], ["zo/counted"], "zo/Counted"),
        nodes("Cast", ["zo/counted"], ["zo/counted_f"], "zo/CountedF", to=int(ir.DataType.FLOAT)),
        nodes("Reshape", ["zo/counted_f", "zo/by_setting"], ["zo/counted_by_setting"], "zo/CountedBySetting"),
        nodes("ReduceSum", ["zo/counted_by_setting", "zo/axis1"], ["zo/counts"], "zo/Counts", keepdims=0),
        nodes("Div", ["zo/loss_sums", "zo/counts"], [LOSSES], "zo/Losses"),
    ]
    graph.insert_after(loss, tail)
    losses = tail[-1].outputs[0]
    losses.type, losses.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape([SETTINGS])
    graph.outputs.append(losses)


def forward_of(model, output: str):
    """Prune a training graph (ModelProto, in place) to the nodes, inputs and initializers `output` depends on: its
    forward, with every memory pass' forward part (attention in causal row chunks, the chunked loss) and none of
    the backward.

    A gate (passes._ir.gate_all) only orders its value after others: where those are not themselves needed (the
    chunked loss' forward gradients, which order its chunks in the training step), the gate waits instead for the
    nearest values they were computed from that the forward does compute (a chunk's log-probabilities), rather
    than pulling that work in."""
    _ir.edit_in_place(model, lambda ir_model: _forward_of(ir_model.graph, output))
    del model.graph.value_info[:]
    return model


def _forward_of(graph, output: str) -> None:
    import onnx_ir as ir

    gates = {}  # gated value -> (its gate's axes input, the values the gate waits for)
    for node in graph:
        opener = _ir.gate_of(node.outputs[0])
        if opener is not None:
            gates[node.outputs[0]] = (node.inputs[1], _ir.gate_waits_for(opener))

    def add_ancestors(needed: set, stack: list) -> None:
        while stack:  # what these depend on; a gated value through its data input only
            value = stack.pop()
            node = value.producer()
            for v in (node.inputs[:1] if value in gates else node.inputs) if node is not None else ():
                if v is not None and v not in needed:
                    needed.add(v)
                    stack.append(v)

    (out,) = [v for v in graph.outputs if v.name == output]
    needed = {out}
    add_ancestors(needed, [out])
    open_gates = {g for g in gates if g in needed and gates[g][1] <= needed}
    axes = [gates[g][0] for g in open_gates]  # an open gate's own nodes (Size, Mul) stay
    needed |= set(axes)
    add_ancestors(needed, axes)
    computed = {v for node in graph if any(o in needed for o in node.outputs) for v in node.outputs}
    graph.outputs[:] = [out]
    for node in list(graph):
        gated = node.outputs[0]
        if gated not in needed or gated not in gates or gated in open_gates:
            continue
        # re-gate on what the forward makes
        afters = _nearest(gates[gated][1], computed)
        data, regate = node.inputs[0], []
        if afters:  # else what it waited for comes from the inputs alone: nothing to order
            regate, (data,) = _ir.gate_all(graph, f"{node.name}/forward", [data], sorted(afters, key=_by_name))
        identity = ir.node("Identity", [data], name=node.name, outputs=[ir.Value(name=f"{gated.name}/forward")])
        graph.insert_before(node, [*regate, identity])
        gated.replace_all_uses_with(identity.outputs[0], replace_graph_outputs=True)
        needed |= {*identity.outputs, *(v for n in regate for v in (*n.inputs, *n.outputs))}
        graph.remove(node, safe=True)
        identity.outputs[0].name = gated.name
    graph.remove([node for node in graph if not any(o in needed for o in node.outputs)])
    for name in [name for name, value in graph.initializers.items() if value not in needed]:
        graph.initializers.pop(name)
    graph.inputs[:] = [v for v in graph.inputs if v in needed]


def _by_name(value) -> str:
    return value.name


def _nearest(values: set, available: set) -> set:
    """The available values closest above `values` (each path upward stops at the first one)."""
    found, seen, stack = set(), set(), list(values)
    while stack:
        value = stack.pop()
        if value in seen:
            continue
        seen.add(value)
        if value in available:
            found.add(value)
        elif value.producer() is not None:
            stack.extend(v for v in value.producer().inputs if v is not None)
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

