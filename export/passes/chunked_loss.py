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
"""

from __future__ import annotations

import logging

import numpy as np

from lars_artifacts import LOGITS

from ._base import GraphPass, PassContext, PassReport, attr, consumers, gate_after, initializer_map, producers
from ._dequantized import dequantized_weights

log = logging.getLogger(__name__)

MS = "com.microsoft"


def find(model, context: PassContext):
    """(sce, sce_grad, lm_head MatMul, logits Reshape, nodes of the old gradient tail) or (None, why not)."""
    prod, cons = producers(model), consumers(model)
    inits = initializer_map(model)
    frozen = (set(inits) - context.trainable) | set(dequantized_weights(model))
    sce = [n for n in model.graph.node if n.op_type == "SoftmaxCrossEntropyLoss"]
    if len(sce) != 1:
        return None, f"{len(sce)} SoftmaxCrossEntropyLoss nodes (expected the one loss)"
    sce = sce[0]
    reshape = prod.get(sce.input[0])
    matmul = prod.get(reshape.input[0]) if reshape is not None and reshape.op_type == "Reshape" else None
    if matmul is None or matmul.op_type != "MatMul" or matmul.input[1] not in frozen:
        return None, "the logits are not Reshape(MatMul(h, frozen Wᵀ))"
    if len(sce.output) < 2:
        return None, "the loss saves no log-probabilities (no backward to rewrite)"
    grads = [n for n in cons.get(sce.output[1], []) if n.op_type == "SoftmaxCrossEntropyLossGrad"]
    h_grad = f"{matmul.input[0]}_grad"
    tail = [n for n in model.graph.node if h_grad in n.output]
    if len(grads) != 1 or len(tail) != 1:
        return None, "no SoftmaxCrossEntropyLossGrad -> dh path to replace"
    return (sce, grads[0], matmul, reshape, tail[0]), None


def apply(model, context: PassContext) -> PassReport:
    from onnx import TensorProto, helper, numpy_helper

    report = PassReport("chunked_loss")
    chunks = context.loss_chunks
    if chunks < 2:
        report.skipped.append(f"--loss-chunks {chunks}: the loss runs whole")
        return report
    found, why_not = find(model, context)
    if found is None:
        report.skipped.append(why_not)
        return report
    sce, sce_grad, matmul, reshape, old_dh = found
    h, w_t = matmul.input  # h [.., d]; w_t [d, vocab], a frozen initializer or its dequantization
    labels, loss = sce.input[1], sce.output[0]
    ignore = int(attr(sce, "ignore_index", -100))
    if (attr(sce, "reduction", b"mean") or b"mean") not in (b"mean", "mean"):
        report.skipped.append("the loss reduction is not mean")
        return report
    loss_grad = sce_grad.input[0]
    h_grad = old_dh.output[0]
    p = "/ChunkedLoss"
    n = lambda s: f"{p}/{s}"  # noqa: E731
    consts = {
        n("zero_i"): np.array([0], np.int64), n("C"): np.array([chunks], np.int64),
        n("C_minus_1"): np.array([chunks - 1], np.int64), n("minus_one"): np.array([-1], np.int64),
        n("ignore"): np.array(ignore, np.int64),
        n("h_shape_end"): np.array([np.iinfo(np.int64).max], np.int64),
    }
    nodes = [
        helper.make_node("Shape", [h], [n("h_shape")], name=n("HShape")),
        helper.make_node("Slice", [n("h_shape"), n("minus_one"), n("h_shape_end")], [n("d")], name=n("HiddenDim")),
        helper.make_node("Concat", [n("minus_one"), n("d")], [n("rows_by_d")], name=n("RowsByD"), axis=0),
        helper.make_node("Reshape", [h, n("rows_by_d")], [n("h_rows")], name=n("Flatten")),
        # only the K rows that carry a label: prompt and padding rows never reach the vocabulary projection
        helper.make_node("Equal", [labels, n("ignore")], [n("ignored")], name=n("Ignored")),
        helper.make_node("Not", [n("ignored")], [n("kept")], name=n("Kept")),
        helper.make_node("NonZero", [n("kept")], [n("kept_at")], name=n("KeptAt")),
        helper.make_node("Reshape", [n("kept_at"), n("minus_one")], [n("rows")], name=n("KeptRows")),
        helper.make_node("Gather", [n("h_rows"), n("rows")], [n("h_kept")], name=n("GatherH"), axis=0),
        helper.make_node("Gather", [labels, n("rows")], [n("l_kept")], name=n("GatherLabels"), axis=0),
        # K rows, chunk c = ceil(K / C), padding C·c - K rows (ignored labels, zero hidden states)
        helper.make_node("Shape", [n("l_kept")], [n("M")], name=n("LabelledRows")),
        helper.make_node("Add", [n("M"), n("C_minus_1")], [n("M_up")], name=n("RoundUp")),
        helper.make_node("Div", [n("M_up"), n("C")], [n("c")], name=n("ChunkRows")),
        helper.make_node("Mul", [n("c"), n("C")], [n("M_pad")], name=n("PaddedRows")),
        helper.make_node("Sub", [n("M_pad"), n("M")], [n("pad")], name=n("PadRows")),
        helper.make_node("Concat", [n("zero_i"), n("zero_i"), n("pad"), n("zero_i")], [n("h_pads")],
                         name=n("HPads"), axis=0),
        helper.make_node("Pad", [n("h_kept"), n("h_pads")], [n("h_pad")], name=n("PadH")),
        helper.make_node("Concat", [n("zero_i"), n("pad")], [n("l_pads")], name=n("LPads"), axis=0),
        helper.make_node("Pad", [n("l_kept"), n("l_pads"), n("ignore")], [n("l_pad")], name=n("PadLabels")),
        helper.make_node("Expand", [n("c"), n("C")], [n("sizes")], name=n("Sizes")),
        helper.make_node("Split", [n("h_pad"), n("sizes")], [n(f"h_chunk{i}") for i in range(chunks)],
                         name=n("SplitH"), axis=0),
        helper.make_node("Split", [n("l_pad"), n("sizes")], [n(f"labels_chunk{i}") for i in range(chunks)],
                         name=n("SplitLabels"), axis=0),
        # count of labelled tokens, as ORT's mean reduction divides by it
        helper.make_node("Cast", [n("M")], [n("count_1")], name=n("CountFloat"), to=TensorProto.FLOAT),
        helper.make_node("Squeeze", [n("count_1")], [n("count")], name=n("Count")),
    ]
    # forward: one chunk after another (chunk i waits for chunk i-1's u through a gate), each chunk's loss and
    # its unit-seed gradient u_i = dCE_i/dh_i while its log-probabilities exist
    nodes.append(helper.make_node("Reciprocal", [n("count")], [n("unit_dce")], name=n("UnitDCE")))
    sums, us = [], []
    for i in range(chunks):
        h_i = n(f"h_chunk{i}")
        if us:
            gate, h_i = gate_after(model, n(f"fwd{i}"), h_i, us[-1])
            nodes += gate
        z, logp, dz, u = n(f"z_chunk{i}"), n(f"logp_chunk{i}"), n(f"dz_chunk{i}"), n(f"u_chunk{i}")
        nodes += [
            helper.make_node("MatMul", [h_i, w_t], [z], name=n(f"Logits{i}")),
            helper.make_node("SoftmaxCrossEntropyLoss", [z, n(f"labels_chunk{i}")], [n(f"ce_chunk{i}"), logp],
                             name=n(f"CE{i}"), reduction="sum", ignore_index=ignore),
            helper.make_node("SoftmaxCrossEntropyLossGrad", [n("unit_dce"), logp, n(f"labels_chunk{i}")], [dz],
                             name=n(f"CEGrad{i}"), domain=MS, reduction="sum", ignore_index=ignore),
            helper.make_node("FusedMatMul", [dz, w_t], [u], name=n(f"dH{i}"), domain=MS, transA=0, transB=1,
                             alpha=1.0),
        ]
        sums.append(n(f"ce_chunk{i}"))
        us.append(u)
    nodes += [helper.make_node("Sum", sums, [n("ce_sum")], name=n("SumCE")),
              helper.make_node("Div", [n("ce_sum"), n("count")], [loss], name=n("MeanCE"))]
    forward = nodes

    # backward: the seed times the forward's unit gradients, back to every row (zeros where there was no label).
    # The zeros wait for the gradient (a gate on dh_kept): their shape is known in the forward, where ORT would
    # otherwise make them and keep a [T, hidden] tensor through the whole backward.
    zeros_gate, rows_shape = gate_after(model, n("ZerosAfter"), n("h_rows_shape"), n("dh_kept"))
    backward = [
        helper.make_node("Concat", us, [n("u_pad")], name=n("ConcatU"), axis=0),
        helper.make_node("Mul", [n("u_pad"), loss_grad], [n("dh_pad")], name=n("dH")),
        helper.make_node("Slice", [n("dh_pad"), n("zero_i"), n("M"), n("zero_i")], [n("dh_kept")], name=n("Unpad")),
        helper.make_node("Shape", [n("h_rows")], [n("h_rows_shape")], name=n("RowsShape")),
        *zeros_gate,
        helper.make_node("ConstantOfShape", [rows_shape], [n("dh_zeros")], name=n("Zeros"),
                         value=numpy_helper.from_array(np.zeros(1, np.float32))),
        helper.make_node("Unsqueeze", [n("rows"), n("minus_one")], [n("rows_nd")], name=n("RowIndices")),
        helper.make_node("ScatterND", [n("dh_zeros"), n("rows_nd"), n("dh_kept")], [n("dh_rows")], name=n("Scatter")),
        helper.make_node("Reshape", [n("dh_rows"), n("h_shape")], [h_grad], name=n("UnflattenDH")),
    ]

    # Drop the old tail: logits, the whole-vocabulary loss, its gradient and the logits' shape bookkeeping.
    old = {id(x) for x in (sce, sce_grad, matmul, reshape, old_dh)}
    logits_grad_path = set()
    frontier = list(sce_grad.output)
    cons = consumers(model)
    while frontier:  # logits_grad -> Reshape -> dY -> (old_dh): remove those in between too
        for node in cons.get(frontier.pop(), []):
            if id(node) not in old and id(node) not in logits_grad_path and h_grad not in node.output:
                logits_grad_path.add(id(node))
                frontier.extend(node.output)
    old |= logits_grad_path
    removed_outputs = {o for x in model.graph.node if id(x) in old for o in x.output}
    # Shape bookkeeping of the removed tensors (ORT's Reshape gradient measures the logits) goes with them.
    old |= {id(x) for x in model.graph.node if x.op_type == "Shape" and x.input[0] in removed_outputs}
    kept = [x for x in model.graph.node if id(x) not in old]
    at_fwd = next(i for i, x in enumerate(model.graph.node) if x is matmul)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    # Insert forward where the lm_head was, backward before the first reader of dh.
    for offset, node in enumerate(forward):
        model.graph.node.insert(min(at_fwd, len(model.graph.node)) + offset, node)
    readers = [i for i, x in enumerate(model.graph.node) if h_grad in x.input]
    at_bwd = min(readers) if readers else len(model.graph.node)
    for offset, node in enumerate(backward):
        model.graph.node.insert(at_bwd + offset, node)
    for name, value in consts.items():
        model.graph.initializer.append(numpy_helper.from_array(value, name))
    outputs = [o for o in model.graph.output if o.name != LOGITS]
    del model.graph.output[:]
    model.graph.output.extend(outputs)
    report.changed = 1
    report.details = {"chunks": chunks, "frees": "three [tokens, vocab] float32 tensors at the turn, less one chunk's",
                      "logits_output_dropped": True, "gradient_in_forward": True}
    return report


CHUNKED_LOSS = GraphPass("chunked_loss", "training", apply, switch="loss_chunks")
