"""Chunked loss: the vocabulary projection and cross-entropy run in row chunks, so [tokens, vocab] is never whole.

ORT's training graph computes logits = h·Wᵀ ([tokens, vocab], 196 KB per token on a 49k vocabulary), keeps them as
a graph output, saves the log-probabilities for the backward and builds their gradient: three [tokens, vocab]
tensors alive at the turn from forward to backward, which is where the step peaks. The pass replaces that tail:

    forward   the K rows of h whose label is not ignore_index (padded to C·c) -> C chunks;
              per chunk, one after the other: z = h_i·Wᵀ, log p = LogSoftmax(z), CE_i = Σ −log p[label],
              u_i = SoftmaxCrossEntropyLossGrad(1 / K, log p, labels_i)·W      ([c, d]: the chunk's dh for dloss = 1)
              loss = Σ_i CE_i / K                         (exactly ORT's "mean" reduction)
    backward  dh = dloss · Concat(u_i)[:K], scattered back to the labelled rows (zeros elsewhere)

The loss is the graph's last node and its gradient is linear in the scalar dloss, so each chunk's hidden-state
gradient is finished while its log-probabilities exist (the fused linear cross-entropy of Liger / Cut Cross-
Entropy): the backward recomputes nothing, and a step does two vocabulary projections per row instead of three.
What stays between forward and backward is u, [K, d]. Only the labelled rows of h are used; at any time one
chunk's [c, vocab] tensors exist; prompt and padding positions never reach the vocabulary projection (with
prompt-masked data that is most of the loss' work). The training graph no longer outputs logits (the runtime never
fetches them in training; the eval graph keeps them). Loss and gradients equal the unchunked ones up to float
summation order (with dloss = 1, the runtime's seed, the scale is the same 1 / K).

Chunk i + 1 starts once chunk i's u exists (a gate on its rows of h), so ORT cannot run two chunks' [c, vocab]
tensors at once; forward-only graphs (export/zo_step.forward_of) drop the u's and order the chunks on their
log-probabilities instead.

Written on onnx_ir (passes/_ir.py): find (the loss block ORT built), build the forward and the backward, splice.
"""

from __future__ import annotations

import logging

import numpy as np

from lars_artifacts import LOGITS

from ._base import GraphPass, PassContext, PassReport
from ._dequantized import is_dequantized
from ._ir import Nodes, gate_all

log = logging.getLogger(__name__)

MS = "com.microsoft"


def find(graph, context: PassContext):
    """(sce, sce_grad, lm_head MatMul, logits Reshape, the node making dh) or (None, why not)."""
    sce = [n for n in graph if n.op_type == "SoftmaxCrossEntropyLoss"]
    if len(sce) != 1:
        return None, f"{len(sce)} SoftmaxCrossEntropyLoss nodes (expected the one loss)"
    sce = sce[0]
    reshape = sce.inputs[0].producer()
    matmul = reshape.inputs[0].producer() if reshape is not None and reshape.op_type == "Reshape" else None
    w_t = matmul.inputs[1] if matmul is not None and matmul.op_type == "MatMul" else None
    frozen = w_t is not None and ((w_t.is_initializer() and w_t.name not in context.trainable) or is_dequantized(w_t))
    if not frozen:
        return None, "the logits are not Reshape(MatMul(h, frozen Wᵀ))"
    if len(sce.outputs) < 2:
        return None, "the loss saves no log-probabilities (no backward to rewrite)"
    grads = [u.node for u in sce.outputs[1].uses() if u.node.op_type == "SoftmaxCrossEntropyLossGrad"]
    h_grad = f"{matmul.inputs[0].name}_grad"
    tail = [n for n in graph if any(v.name == h_grad for v in n.outputs)]
    if len(grads) != 1 or len(tail) != 1:
        return None, "no SoftmaxCrossEntropyLossGrad -> dh path to replace"
    return (sce, grads[0], matmul, reshape, tail[0]), None


def _forward(graph, h, w_t, labels, loss: str, ignore: int, chunks: int):
    """The forward's nodes (the labelled rows of h in chunks, each chunk's loss and unit-seed gradient u_i, the mean
    loss named `loss`), the maker holding their values and constants, and the u_i."""
    import onnx_ir as ir

    p = "/ChunkedLoss"
    n = lambda s: f"{p}/{s}"  # noqa: E731
    consts = {
        n("zero_i"): np.array([0], np.int64), n("C"): np.array([chunks], np.int64),
        n("C_minus_1"): np.array([chunks - 1], np.int64), n("minus_one"): np.array([-1], np.int64),
        n("ignore"): np.array(ignore, np.int64),
        n("h_shape_end"): np.array([np.iinfo(np.int64).max], np.int64),
    }
    node = Nodes(consts)
    nodes = [
        node("Shape", [h], [n("h_shape")], n("HShape")),
        node("Slice", [n("h_shape"), n("minus_one"), n("h_shape_end")], [n("d")], n("HiddenDim")),
        node("Concat", [n("minus_one"), n("d")], [n("rows_by_d")], n("RowsByD"), axis=0),
        node("Reshape", [h, n("rows_by_d")], [n("h_rows")], n("Flatten")),
        # only the K rows that carry a label: prompt and padding rows never reach the vocabulary projection
        node("Equal", [labels, n("ignore")], [n("ignored")], n("Ignored")),
        node("Not", [n("ignored")], [n("kept")], n("Kept")),
        node("NonZero", [n("kept")], [n("kept_at")], n("KeptAt")),
        node("Reshape", [n("kept_at"), n("minus_one")], [n("rows")], n("KeptRows")),
        node("Gather", [n("h_rows"), n("rows")], [n("h_kept")], n("GatherH"), axis=0),
        node("Gather", [labels, n("rows")], [n("l_kept")], n("GatherLabels"), axis=0),
        # K rows, chunk c = ceil(K / C), padding C·c - K rows (ignored labels, zero hidden states)
        node("Shape", [n("l_kept")], [n("M")], n("LabelledRows")),
        node("Add", [n("M"), n("C_minus_1")], [n("M_up")], n("RoundUp")),
        node("Div", [n("M_up"), n("C")], [n("c")], n("ChunkRows")),
        node("Mul", [n("c"), n("C")], [n("M_pad")], n("PaddedRows")),
        node("Sub", [n("M_pad"), n("M")], [n("pad")], n("PadRows")),
        node("Concat", [n("zero_i"), n("zero_i"), n("pad"), n("zero_i")], [n("h_pads")], n("HPads"), axis=0),
        node("Pad", [n("h_kept"), n("h_pads")], [n("h_pad")], n("PadH")),
        node("Concat", [n("zero_i"), n("pad")], [n("l_pads")], n("LPads"), axis=0),
        node("Pad", [n("l_kept"), n("l_pads"), n("ignore")], [n("l_pad")], n("PadLabels")),
        node("Expand", [n("c"), n("C")], [n("sizes")], n("Sizes")),
        node("Split", [n("h_pad"), n("sizes")], [n(f"h_chunk{i}") for i in range(chunks)], n("SplitH"), axis=0),
        node("Split", [n("l_pad"), n("sizes")], [n(f"labels_chunk{i}") for i in range(chunks)], n("SplitLabels"),
             axis=0),
        # count of labelled tokens, as ORT's mean reduction divides by it
        node("Cast", [n("M")], [n("count_1")], n("CountFloat"), to=int(ir.DataType.FLOAT)),
        node("Squeeze", [n("count_1")], [n("count")], n("Count")),
    ]
    # forward: one chunk after another (chunk i waits for chunk i-1's u through a gate), each chunk's loss and
    # its unit-seed gradient u_i = dCE_i/dh_i while its log-probabilities exist
    nodes.append(node("Reciprocal", [n("count")], [n("unit_dce")], n("UnitDCE")))
    sums, us = [], []
    for i in range(chunks):
        h_i = node.values[n(f"h_chunk{i}")]
        if us:
            gate, (h_i,) = gate_all(graph, n(f"fwd{i}"), [h_i], [us[-1]])
            nodes += gate
        logp, u = n(f"logp_chunk{i}"), n(f"u_chunk{i}")
        nodes += [
            node("MatMul", [h_i, w_t], [n(f"z_chunk{i}")], n(f"Logits{i}")),
            node("SoftmaxCrossEntropyLoss", [n(f"z_chunk{i}"), n(f"labels_chunk{i}")], [n(f"ce_chunk{i}"), logp],
                 n(f"CE{i}"), reduction="sum", ignore_index=ignore),
            node("SoftmaxCrossEntropyLossGrad", [n("unit_dce"), logp, n(f"labels_chunk{i}")], [n(f"dz_chunk{i}")],
                 n(f"CEGrad{i}"), domain=MS, reduction="sum", ignore_index=ignore),
            node("FusedMatMul", [n(f"dz_chunk{i}"), w_t], [u], n(f"dH{i}"), domain=MS, transA=0, transB=1,
                 alpha=1.0),
        ]
        sums.append(n(f"ce_chunk{i}"))
        us.append(node.values[u])
    nodes += [node("Sum", sums, [n("ce_sum")], n("SumCE")),
              node("Div", [n("ce_sum"), n("count")], [loss], n("MeanCE"))]
    return node, nodes, us


def _backward(graph, node: Nodes, us: list, loss_grad, h_grad) -> list:
    """The backward's nodes: dh (named as `h_grad`) = the seed `loss_grad` times the forward's u_i, scattered back to
    every row (zeros where there was no label)."""
    import onnx_ir as ir

    n = lambda s: f"/ChunkedLoss/{s}"  # noqa: E731
    # The zeros wait for the gradient (a gate on dh_kept): their shape is known in the forward, where ORT would
    # otherwise make them and keep a [T, hidden] tensor through the whole backward.
    concat_u = node("Concat", us, [n("u_pad")], n("ConcatU"), axis=0)
    scale = node("Mul", [n("u_pad"), loss_grad], [n("dh_pad")], n("dH"))
    unpad = node("Slice", [n("dh_pad"), n("zero_i"), n("M"), n("zero_i")], [n("dh_kept")], n("Unpad"))
    rows_shape = node("Shape", [n("h_rows")], [n("h_rows_shape")], n("RowsShape"))
    zeros_gate, (gated_shape,) = gate_all(graph, n("ZerosAfter"), [rows_shape.outputs[0]], [unpad.outputs[0]])
    return [
        concat_u, scale, unpad, rows_shape, *zeros_gate,
        node("ConstantOfShape", [gated_shape], [n("dh_zeros")], n("Zeros"), value=ir.tensor(np.zeros(1, np.float32))),
        node("Unsqueeze", [n("rows"), n("minus_one")], [n("rows_nd")], n("RowIndices")),
        node("ScatterND", [n("dh_zeros"), n("rows_nd"), n("dh_kept")], [n("dh_rows")], n("Scatter")),
        node("Reshape", [n("dh_rows"), n("h_shape")], [h_grad.name], n("UnflattenDH")),
    ]


def _splice(graph, found: tuple, forward: list, backward: list) -> None:
    """Replace the old tail (`found`) with `forward` (where the lm_head was) and `backward` (before the first reader of
    dh); the new loss and dh take the old ones' places among the outputs and readers."""
    import onnx_ir as ir

    sce, sce_grad, matmul, reshape, old_dh = found
    loss, h_grad = sce.outputs[0], old_dh.outputs[0]
    # Drop the old tail: logits, the whole-vocabulary loss, its gradient and the logits' shape bookkeeping.
    old = {sce, sce_grad, matmul, reshape, old_dh}
    frontier = list(sce_grad.outputs)
    while frontier:  # logits_grad -> Reshape -> dY -> (old_dh): remove those in between too
        for use in frontier.pop().uses():
            if use.node not in old and h_grad not in use.node.outputs:
                old.add(use.node)
                frontier.extend(use.node.outputs)
    removed_outputs = {v for x in graph if x in old for v in x.outputs}
    # Shape bookkeeping of the removed tensors (ORT's Reshape gradient measures the logits) goes with them.
    old |= {x for x in graph if x.op_type == "Shape" and x.inputs[0] in removed_outputs}
    stored = list(graph)
    kept = [x for x in stored if x not in old]
    at_fwd = stored.index(matmul)  # the lm_head's place before the removal, in the list after it
    new_loss, new_h_grad = forward[-1].outputs[0], backward[-1].outputs[0]
    new_loss.type, new_loss.shape = loss.type, loss.shape  # as the graph output declared it
    graph.outputs[:] = [new_loss if v is loss else new_h_grad if v is h_grad else v
                        for v in graph.outputs if v.name != LOGITS]
    for before, after in ((loss, new_loss), (h_grad, new_h_grad)):
        ir.convenience.replace_all_uses_with(before, after)
    graph.remove([x for x in stored if x in old], safe=True)  # checks that nothing left reads what they made
    # Insert forward where the lm_head was, backward before the first reader of dh.
    if at_fwd < len(kept):
        graph.insert_before(kept[at_fwd], forward)
    else:
        graph.extend(forward)
    reader = next((x for x in graph if new_h_grad in x.inputs), None)
    if reader is not None:
        graph.insert_before(reader, backward)
    else:
        graph.extend(backward)


def apply(model, context: PassContext) -> PassReport:
    graph = model.graph
    report = PassReport("chunked_loss")
    chunks = context.loss_chunks
    if chunks < 2:
        report.skipped.append(f"--loss-chunks {chunks}: the loss runs whole")
        return report
    found, why_not = find(graph, context)
    if found is None:
        report.skipped.append(why_not)
        return report
    sce, sce_grad, matmul, _reshape, old_dh = found
    h, w_t = matmul.inputs  # h [.., d]; w_t [d, vocab], a frozen initializer or its dequantization
    labels, loss = sce.inputs[1], sce.outputs[0]
    ignore = sce.attributes.get_int("ignore_index", -100)
    if (sce.attributes.get_string("reduction", "mean") or "mean") != "mean":
        report.skipped.append("the loss reduction is not mean")
        return report
    node, forward, us = _forward(graph, h, w_t, labels, loss.name, ignore, chunks)
    backward = _backward(graph, node, us, sce_grad.inputs[0], old_dh.outputs[0])
    _splice(graph, found, forward, backward)
    for constant in node.constants:
        graph.register_initializer(constant)
    report.changed = 1
    report.details = {"chunks": chunks, "frees": "three [tokens, vocab] float32 tensors at the turn, less one chunk's",
                      "logits_output_dropped": True, "gradient_in_forward": True}
    return report


CHUNKED_LOSS = GraphPass("chunked_loss", "training", apply, switch="loss_chunks", ir=True)
