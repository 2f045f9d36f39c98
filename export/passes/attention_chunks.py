"""Chunked attention: each layer's attention runs one group of heads at a time, forward and backward, and the
backward recomputes each group's probabilities, so at most one group's [T, T] tensors exist at any time.

Attention recompute alone removes the probabilities P [batch, heads, T, T] from what the forward keeps, but one
layer's attention still materialises whole: the forward's scores, scaled scores and P (two alive at a time), and
in the backward the recomputed P with its gradients dP and dS, three [heads, T, T] tensors (1.8 GB on SmolLM2 at
4096 tokens). This pass replaces the core of each layer,

    O = Softmax(s·Q·Kᵀ + mask)·V        (Q, Kᵀ, V already split into heads and, for GQA, expanded)

and ORT's gradient of it, by G groups of heads computed one after the other:

    forward   per group g: O_g = Softmax(s·Q_g·K_gᵀ + mask)·V_g;          O = Concat_g(O_g)
    backward  per group g: P_g recomputed as above,  dV_g = P_gᵀ·dO_g,  dP_g = dO_g·V_gᵀ,
              dS_g = s·SoftmaxGrad(dP_g, P_g),  dQ_g = dS_g·K_g,  dK_gᵀ = Q_gᵀ·dS_g;
              dQ, dKᵀ, dV = Concat_g(...)

with the same kernels ORT's own gradient uses (MatMul, FusedMatMul, SoftmaxGrad_13), so the gradients equal the
unchunked ones. Each group waits for the previous group's output through a gate, so ORT runs them in turn; the
backward's inputs wait for the gradient arriving at the layer, so nothing is recomputed early and common-
subexpression elimination cannot merge a backward group into the forward. It subsumes attention recompute (which
then finds no probabilities to recompute); layer recompute copies the chunked forward like any other.

Written on onnx_ir (passes/_ir.py); the new nodes are made by name (_ir.Nodes), as the graph names them.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from ._base import GraphPass, PassContext, PassReport
from ._ir import Nodes, ancestors, backward_nodes, descendants, gate_all, shared_initializer
from .attention_recompute import find_chain

log = logging.getLogger(__name__)

MS = "com.microsoft"
_SCALE_OPS = {"Mul", "Div"}
_MASK_OPS = {"Add"}
HEADS = -3  # the head axis of Q, V, dO [..., heads, T, head_dim] and Kᵀ [..., heads, head_dim, T]


def find(graph):
    """For each Softmax: (softmax, (chain [score MatMul .. Softmax], P·V MatMul), None) or (softmax, None, why not)."""
    for softmax in [n for n in graph if n.op_type == "Softmax"]:
        chain, why_not = find_chain(softmax)
        if why_not:
            yield softmax, None, why_not
            continue
        probs = softmax.outputs[0]
        pv = [u.node for u in probs.uses() if u.node.op_type == "MatMul" and u.node.inputs[0] is probs]
        if len(pv) != 1:
            yield softmax, None, "no single P·V MatMul reads the probabilities"
            continue
        yield softmax, (chain, pv[0]), None


def check(chain, pv, made: dict, rows: int = 1) -> str | None:
    """None if the layer's core can be chunked, else why not. Between the scores and the Softmax only a scale by a
    constant (Mul/Div) and an added mask are supported (with row chunks, one mask of rank >= 2 whose rows are the
    query rows or broadcast one row); ORT's gradients of Q, Kᵀ and V must each come from one matrix product (no
    other differentiable reader). `made`: the values the graph's nodes make, by name."""
    matmul = chain[0]
    if matmul.op_type != "MatMul":
        return f"the scores come from {matmul.op_type}, not MatMul"
    if rows >= 2 and sum(n.op_type in _MASK_OPS for n in chain[1:-1]) > 1:
        return "more than one tensor added to the scores (row chunks slice one mask)"
    for k, node in enumerate(chain[1:-1]):
        const = _constant_input(node, chain[k].outputs[0])
        if node.op_type not in _SCALE_OPS | _MASK_OPS:
            return f"{node.op_type} between the scores and the Softmax (only a scale and a mask are chunked)"
        if node.op_type in _SCALE_OPS and (const is None or not _scalar_constant(const)):
            return f"{node.op_type} by a non-constant scale"
        if node.op_type == "Div" and node.inputs[0] is not chain[k].outputs[0]:
            return "the scores divide a constant"
    for t in (matmul.inputs[0], matmul.inputs[1], pv.inputs[1], pv.outputs[0]):
        if f"{t.name}_grad" not in made:
            return f"no gradient tensor {t.name}_grad (ORT names the gradient of t 't_grad')"
    for t in (matmul.inputs[0], matmul.inputs[1], pv.inputs[1]):
        op = made[f"{t.name}_grad"].producer().op_type
        if op not in ("MatMul", "FusedMatMul"):
            return f"the gradient of {t.name} is a {op} (another reader needs a gradient too)"
    return None


def _constant_input(node, chain_input):
    others = [v for v in node.inputs if v is not chain_input]
    return others[0] if len(others) == 1 else None


def _scalar_constant(value) -> bool:
    # from the shape: a large weight's data is not loaded
    return value is not None and value.is_initializer() and math.prod(value.shape.numpy()) == 1


def _split_sizes(b: Nodes, heads: int, groups: int):
    sizes = np.array([heads // groups + (1 if g < heads % groups else 0) for g in range(groups)], np.int64)
    return shared_initializer(b.graph, f"passes.attention_chunks.sizes{heads}x{groups}", sizes)


def _i64(b: Nodes, value: int):
    """A shared 1-D int64 initializer [value]."""
    return shared_initializer(b.graph, f"passes.attention_chunks.i64_{value}", np.array([value], np.int64))


def _gate(b: Nodes, prefix: str, tensors: list, after) -> tuple[list, list]:
    """_ir.gate_all on values given by name or as Values (`after`: one or several)."""
    afters = after if isinstance(after, list) else [after]
    return gate_all(b.graph, prefix, [b.value(t) for t in tensors], [b.value(t) for t in afters])


def _row_bounds(b: Nodes, p, length, mask: str | None, rows: int) -> tuple[list, list[list[str]]]:
    """Nodes computing, for each of `rows` chunks of T query rows, the 1-D bounds [start, end] = T·j // rows,
    T·(j + 1) // rows, and the mask's: the same rows of a mask that has T of them, its only row when it broadcasts
    one (min(start, rows_m - 1), max(min(end, rows_m), that + 1)). `length` is the node computing T as p("t") (a
    Shape: lengths are read at run time); `p` names the nodes and tensors."""
    nodes = [length]
    if mask is not None:
        nodes += [b("Shape", [mask], [p("tm")], name=p("ShapeMask"), start=-2, end=-1),
                  b("Sub", [p("tm"), _i64(b, 1)], [p("tm_last")], name=p("MaskLast"))]
    cuts = []
    for j in range(rows + 1):
        nodes += [b("Mul", [p("t"), _i64(b, j)], [p(f"tj{j}")], name=p(f"Mul{j}")),
                  b("Div", [p(f"tj{j}"), _i64(b, rows)], [p(f"b{j}")], name=p(f"Div{j}"))]
        cuts.append(p(f"b{j}"))
    bounds = []
    for j in range(rows):
        start, end = cuts[j], cuts[j + 1]
        if mask is None:
            bounds.append([start, end])
            continue
        m0, m1 = p(f"m{j}_start"), p(f"m{j}_end")
        nodes += [b("Min", [start, p("tm_last")], [m0], name=p(f"MaskStart{j}")),
                  b("Min", [end, p("tm")], [p(f"m{j}_upto")], name=p(f"MaskUpTo{j}")),
                  b("Add", [m0, _i64(b, 1)], [p(f"m{j}_one")], name=p(f"MaskOne{j}")),
                  b("Max", [p(f"m{j}_upto"), p(f"m{j}_one")], [m1], name=p(f"MaskEnd{j}"))]
        bounds.append([start, end, m0, m1])
    return nodes, bounds


def _axes(b: Nodes, *axes: int):
    return shared_initializer(b.graph, "passes.attention_chunks.axes" + "_".join(map(str, axes)),
                              np.array(axes, np.int64))


def _pad_zeros(b: Nodes, prefix: str, q: str) -> list:
    """Nodes computing the zeros that lead a Pad's pads for a tensor of q's rank: one per axis (the begins), one
    per axis but the last, and one per axis but the last two (the ends before the key axis of Kᵀ, of V)."""
    p = lambda s: f"{prefix}/rows/{s}"  # noqa: E731
    nodes = []
    for tag, end in (("all", None), ("but1", -1), ("but2", -2)):
        shape = b("Shape", [q], [p(f"shape_{tag}")], name=p(f"Shape_{tag}"),
                                 **({} if end is None else {"end": end}))
        nodes += [shape, b("Mul", [p(f"shape_{tag}"), _i64(b, 0)], [p(f"zeros_{tag}")],
                                          name=p(f"Zeros_{tag}"))]
    return nodes


def _pads(b: Nodes, prefix: str, r: str, skipped: str) -> list:
    """Nodes computing a chunk's pads (Pad-13 layout, begins then ends) that grow its dKᵀ [..., hd, end] and
    dV [..., end, hd] to T keys: `skipped` (T - end) zeros after the last key. (Pad-13 has no axes input: the
    pads list spans q's rank, whose zeros _pad_zeros measures per layer.)"""
    p = lambda s: f"{prefix}/{s}"  # noqa: E731
    rows = f"{prefix}/rows"
    return [b("Concat", [f"{rows}/zeros_all", f"{rows}/zeros_but1", skipped],
                             [p(f"{r}/pads_dkt")], name=p(f"{r}/PadsKt"), axis=0),
            b("Concat", [f"{rows}/zeros_all", f"{rows}/zeros_but2", skipped, _i64(b, 0)],
                             [p(f"{r}/pads_dv")], name=p(f"{r}/PadsV"), axis=0)]


def _causal_rows(b: Nodes, mask: str, rows: int) -> tuple[list, list[dict]]:
    """Nodes computing, once for every layer that adds `mask` under a causal mask, each of `rows` chunks' query
    bounds [start], [end] = T·j // rows, T·(j + 1) // rows, its block of the mask (its rows, or the only row of a
    mask that broadcasts one, and the keys before `end`) and the keys it skips, T - end (None for the last chunk,
    which ends at T and is not padded); and those names per chunk.

    Shared because they depend on the mask alone: under a causal mask query i is key i, so T is the mask's key count,
    the same in every layer. Made per layer they would be ~100 nodes of shape arithmetic and a Slice of the mask per
    chunk, three times with layer recompute (ORT holds ~4.7 KB of session memory per node: 75 MB on SmolLM2 at 16
    chunks, measured). The blocks together hold about half the [T, T] mask, which nothing else reads once cut."""
    p = lambda s: f"{mask.name}/causal_rows{rows}/{s}"  # noqa: E731
    keys = b("Shape", [mask], [p("t")], name=p("ShapeKeys"), start=-1)
    nodes, bounds = _row_bounds(b, p, keys, mask, rows)
    chunks = []
    for j, (start, end, m0, m1) in enumerate(bounds):
        block, skipped = p(f"r{j}/mask"), p(f"r{j}/skipped") if j < rows - 1 else None
        nodes += [b("Concat", [m0, _i64(b, 0)], [p(f"r{j}/mask_starts")], name=p(f"r{j}/MaskStarts"),
                                   axis=0),
                  b("Concat", [m1, end], [p(f"r{j}/mask_ends")], name=p(f"r{j}/MaskEnds"), axis=0),
                  b("Slice", [mask, p(f"r{j}/mask_starts"), p(f"r{j}/mask_ends"), _axes(b, -2, -1)],
                                   [block], name=p(f"r{j}/RowsMask"))]
        if skipped:
            nodes.append(b("Sub", [p("t"), end], [skipped], name=p(f"r{j}/Skipped")))
        chunks.append({"start": start, "end": end, "mask": block, "skipped": skipped})
    return nodes, chunks


def _piece(b: Nodes, chain, tag: str, q: str, kt: str, v: str, mask: str | None, d_out: str | None, axis: int):
    """Nodes of one piece of the core (a group of heads, all its rows or one chunk of them) from its q, kt, v (and
    its rows of the mask when sliced): {"o"} forward, else {"dq", "dkt", "dv"} from its rows of d_out. In the
    backward dQ comes last (its Kᵀ is gated on dKᵀ and dV): the next piece waits for dQ, so the piece's [rows, T]
    tensors are all freed before it starts (measured: without it ORT deferred a piece's dKᵀ or dV to the end of the
    layer, keeping one [rows, T] tensor per piece alive)."""
    x = f"{tag}/scores"
    nodes = [b("MatMul", [q, kt], [x], name=f"{tag}/Scores")]
    scales = []
    for k, node in enumerate(chain[1:-1]):  # the scale and the mask, as the layer applies them
        out = f"{tag}/{node.op_type}{k}"
        ins = [x if i is chain[k].outputs[0] else (mask if node.op_type in _MASK_OPS and mask else i)
               for i in node.inputs]
        nodes.append(b(node.op_type, ins, [out], name=out))
        if node.op_type in _SCALE_OPS:
            scales.append((node.op_type, _constant_input(node, chain[k].outputs[0])))
        x = out
    probs = f"{tag}/probs"
    nodes.append(b("Softmax", [x], [probs], name=f"{tag}/Softmax", axis=axis))
    if d_out is None:
        nodes.append(b("MatMul", [probs, v], [f"{tag}/o"], name=f"{tag}/PV"))
        return nodes, {"o": f"{tag}/o"}
    dv, dp, ds = f"{tag}/dv", f"{tag}/dp", f"{tag}/ds"
    nodes += [
        b("FusedMatMul", [probs, d_out], [dv], name=f"{tag}/dV", domain=MS, transA=1, transB=0,
                         alpha=1.0),
        b("FusedMatMul", [d_out, v], [dp], name=f"{tag}/dP", domain=MS, transA=0, transB=1,
                         alpha=1.0),
        b("SoftmaxGrad_13", [dp, probs], [ds], name=f"{tag}/SoftmaxGrad", domain=MS, axis=axis),
    ]
    for k, (op, const) in enumerate(reversed(scales)):  # the mask's Add passes the gradient through
        scaled = f"{tag}/ds_scaled{k}"
        nodes.append(b(op, [ds, const], [scaled], name=f"{tag}/dScale{k}"))
        ds = scaled
    dq, dkt = f"{tag}/dq", f"{tag}/dkt"
    nodes.append(b("FusedMatMul", [q, ds], [dkt], name=f"{tag}/dKt", domain=MS, transA=1, transB=0,
                                  alpha=1.0))
    gate, (kt_last,) = _gate(b, f"{tag}/dq_last", [kt], [dkt, dv])
    nodes += gate
    nodes.append(b("FusedMatMul", [ds, kt_last], [dq], name=f"{tag}/dQ", domain=MS, transA=0,
                                  transB=1, alpha=1.0))
    return nodes, {"dq": dq, "dkt": dkt, "dv": dv}


def chunked_core(b: Nodes, chain, groups: int, heads: int, prefix: str, q: str, kt: str, v: str, results: dict,
                 d_out: str | None = None, rows: int = 1, causal: bool = False, shared: dict | None = None) -> list:
    """Nodes computing the attention core of `chain` from q, kt, v ([batch, heads, ...]) in `groups` groups of
    heads, one after the other, into results["o"] (forward, d_out None), or from the output gradient d_out into
    results["dq"], ["dkt"], ["dv"]. With rows >= 2 the query rows also run in that many chunks, one after the other
    (each chunk through every group): a chunk's probabilities need all keys but only its rows (softmax is per row),
    so the outputs and dQ are concatenated by rows, and dKᵀ and dV summed over the chunks.

    `causal` (the mask hides every key after the query's own position, and query i is key i: a decoder LM's
    training step): a chunk of rows [start, end) reads only the keys before `end`, and its dKᵀ and dV are padded
    with zeros to T before the sum. The skipped scores are masked, so their probabilities are exactly 0 (exp
    underflows) and leaving them out changes no value: with N chunks the core does (N + 1) / 2N of the work. The
    chunks' bounds and mask blocks are then made once per mask (_causal_rows) and kept in `shared` for the other
    layers and the backward: the returned nodes include them the first time."""
    p = lambda s: f"{prefix}/{s}"  # noqa: E731
    softmax = chain[-1]
    axis = softmax.attributes.get_int("axis", -1)
    parts: dict[str, list[str]] = {}  # tag -> the tensor's part of each group of heads

    def split(t: str, tag: str) -> list:
        """Nodes splitting t into parts[tag] by groups of heads; none for one group (a Split copies)."""
        if groups == 1:
            parts[tag] = [t]
            return []
        parts[tag] = [p(f"{tag}{g}") for g in range(groups)]
        return [b("Split", [t, _split_sizes(b, heads, groups)], parts[tag], name=p(f"Split_{tag}"),
                                 axis=HEADS)]

    masks = [next(i for i in node.inputs if i is not chain[k].outputs[0]) for k, node in enumerate(chain[1:-1])
             if node.op_type in _MASK_OPS]
    mask = masks[0] if masks else None
    skip = causal and rows >= 2 and mask is not None  # without a mask in the chain nothing says keys are hidden
    nodes = [] if skip else split(kt, "kt") + split(v, "v")
    per_group: dict[str, list[list[str]]] = {key: [[] for _ in range(groups)] for key in results}
    by_rows: dict[str, list[str]] = {key: [] for key in results}  # one chunk of rows, all heads
    previous = None
    row_axis = _i64(b, -2) if rows >= 2 else None
    if rows < 2:
        nodes += split(q, "q") + (split(d_out, "do") if d_out else [])
        chunks = [("", None, None)]
    elif skip:
        shared = {} if shared is None else shared
        if (mask, rows) not in shared:
            plan_nodes, shared[(mask, rows)] = _causal_rows(b, mask, rows)
            nodes += plan_nodes
        chunks = [(f"r{j}", [c["start"], c["end"]], c["mask"]) for j, c in enumerate(shared[(mask, rows)])]
        skipped = [c["skipped"] for c in shared[(mask, rows)]]
        if d_out:  # only the backward pads (its dKᵀ and dV)
            nodes += _pad_zeros(b, prefix, q)
    else:
        rows_p = lambda s: f"{prefix}/rows/{s}"  # noqa: E731
        length = b("Shape", [q], [rows_p("t")], name=rows_p("ShapeT"), start=-2, end=-1)
        bound_nodes, bounds = _row_bounds(b, rows_p, length, mask, rows)
        nodes += bound_nodes
        chunks = [(f"r{j}", bound, mask) for j, bound in enumerate(bounds)]
    for j, (tag, bound, mask) in enumerate(chunks):
        mask_rows, r = None, tag
        keys = ""  # the split of Kᵀ and V this chunk reads: all keys, or (skip) the keys before its end
        if bound is not None:
            if previous is not None:  # this chunk's slices wait for the last piece's result
                gate, bound = _gate(b, p(f"{r}/bounds"), bound, previous)
                nodes += gate
            nodes.append(b("Slice", [q, bound[0], bound[1], row_axis], [p(f"{r}/q")],
                                          name=p(f"{r}/RowsQ")))
            nodes += split(p(f"{r}/q"), f"{r}/q")
            if d_out:
                nodes.append(b("Slice", [d_out, bound[0], bound[1], row_axis], [p(f"{r}/do")],
                                              name=p(f"{r}/RowsDO")))
                nodes += split(p(f"{r}/do"), f"{r}/do")
            if skip:
                keys = f"{r}/"
                zero, key_axis = _i64(b, 0), _i64(b, -1)
                nodes += [b("Slice", [kt, zero, bound[1], key_axis], [p(f"{r}/kt")],
                                           name=p(f"{r}/KeysKt")),
                          b("Slice", [v, zero, bound[1], row_axis], [p(f"{r}/v")], name=p(f"{r}/KeysV"))]
                nodes += split(p(f"{r}/kt"), f"{r}/kt") + split(p(f"{r}/v"), f"{r}/v")
            if skip:  # the chunk's block of the mask (its rows, the keys before its end), cut once for all layers
                mask_rows = mask
            elif mask is not None:
                mask_rows = p(f"{r}/mask")
                nodes.append(b("Slice", [mask, bound[2], bound[3], row_axis], [mask_rows],
                                              name=p(f"{r}/RowsMask")))
        pad = skip and d_out is not None and j < len(chunks) - 1  # the last chunk ends at T
        if pad:
            nodes += _pads(b, prefix, r, skipped[j])
        pieces = {key: [] for key in results}
        for g in range(groups):
            piece = f"g{g}" if not r else f"{r}g{g}"
            qg, dog = parts[f"{r}/q" if r else "q"][g], parts[f"{r}/do" if r else "do"][g] if d_out else None
            # One piece after the other (a chunk's first piece waits through its gated bounds).
            # dO's rows are gated too: dP = dO·Vᵀ needs nothing else, so ORT would otherwise compute every
            # piece's [rows, T] dP as soon as dO exists (measured: all of a layer's at once, the step's peak).
            if previous is not None and (g > 0 or not r):
                gate, gated = _gate(b, p(piece), [qg] + ([dog] if d_out else []), previous)
                nodes += gate
                qg, dog = gated[0], gated[-1]
            piece_nodes, out = _piece(b, chain, p(piece), qg, parts[f"{keys}kt"][g], parts[f"{keys}v"][g],
                                      mask_rows, dog if d_out else None, axis)
            nodes += piece_nodes
            for key in results:
                term = out[key]
                if pad and key in ("dkt", "dv"):  # zeros for the keys this chunk skipped
                    term = p(f"{piece}/{key}_padded")
                    nodes.append(b("Pad", [out[key], p(f"{r}/pads_{key}")], [term],
                                                  name=p(f"{piece}/Pad_{key}")))
                per_group[key][g].append(term)
                pieces[key].append(out[key])
            previous = out["o" if d_out is None else "dq"]
        for key in ("o", "dq"):  # this chunk's rows of every head
            if key in results and r:
                nodes.append(b("Concat", pieces[key], [p(f"{r}/{key}")], name=p(f"{r}/Concat_{key}"),
                                              axis=HEADS))
                by_rows[key].append(p(f"{r}/{key}"))
    for key, name in results.items():
        if rows < 2 or key in ("dkt", "dv"):  # by groups of heads (summed over the chunks of rows first)
            parts = []
            for g, terms in enumerate(per_group[key]):
                total = terms[0]
                for j, term in enumerate(terms[1:], 1):
                    total_next = p(f"g{g}/{key}_sum{j}")
                    nodes.append(b("Add", [total, term], [total_next], name=p(f"g{g}/Sum_{key}{j}")))
                    total = total_next
                parts.append(total)
            nodes.append(b("Concat", parts, [name], name=p(f"Concat_{key}"), axis=HEADS))
        else:  # by chunks of rows
            nodes.append(b("Concat", by_rows[key], [name], name=p(f"Concat_{key}"), axis=-2))
    return nodes


def apply(model, context: PassContext) -> PassReport:
    import onnx_ir as ir

    graph = model.graph
    report = PassReport("attention_chunks")
    heads = context.attention_heads
    groups = max(1, min(context.attention_chunks, heads))
    rows = context.attention_row_chunks
    if groups < 2 and rows < 2:
        report.skipped.append(f"--attention-chunks {context.attention_chunks} with {heads} heads and "
                              f"--attention-row-chunks {rows}: attention runs whole")
        return report
    made = {v.name: v for node in graph for v in node.outputs}
    backward = set(backward_nodes(graph))
    b = Nodes(graph=graph)
    removed: set = set()
    replaced = []  # (old value, the name of the new value that takes its place)
    skipping = 0  # layers whose row chunks skip the keys after their rows (a causal mask in the chain)
    before: dict = {}  # anchor node -> new nodes to put before it
    shared: dict = {}  # what every layer's causal row chunks share (chunked_core); the first layer's nodes make it
    for softmax, match, why_not in list(find(graph)):
        if match is None or (why_not := check(*match, made, rows)):
            log.info("attention_chunks: leaving %s: %s", softmax.name, why_not)
            report.skipped.append(f"{softmax.name}: {why_not}")
            continue
        chain, pv = match
        q, kt, v, o = chain[0].inputs[0], chain[0].inputs[1], pv.inputs[1], pv.outputs[0]
        grads = [made[f"{t.name}_grad"] for t in (q, kt, v)]
        d_out = made[f"{o.name}_grad"]
        # What goes: the forward core and ORT's backward of it (every backward node on a path from dO to a grad),
        # and Shape/Size nodes that only measured those tensors.
        gone_nodes = [*chain, pv, *_between(graph, d_out, set(grads), backward)]
        gone_outputs = {t for n in gone_nodes for t in n.outputs} - set(grads) - {o}
        measures = [n for n in graph if n.op_type in ("Shape", "Size") and any(i in gone_outputs for i in n.inputs)]
        gone = set(gone_nodes + measures)
        gone_outputs |= {t for n in measures for t in n.outputs}
        reader = next((n for n in graph if n not in gone and any(i in gone_outputs for i in n.inputs)), None)
        if reader is not None:
            report.skipped.append(f"{softmax.name}: {reader.name} reads an attention intermediate")
            continue
        prefix = softmax.name.rsplit("/", 1)[0] + "/AttentionChunks"
        fwd = chunked_core(b, chain, groups, heads, f"{prefix}/fwd", q, kt, v, {"o": o.name}, rows=rows,
                           causal=context.causal_attention, shared=shared)
        # The backward starts once dO exists: Q, Kᵀ and V go through a gate on it (which also keeps CSE away).
        bwd, gated = [], []
        for k, t in enumerate((q, kt, v)):
            gate, (value,) = _gate(b, f"{prefix}/bwd/in{k}", [t], d_out)
            bwd += gate
            gated.append(value)
        results = dict(zip(("dq", "dkt", "dv"), (g.name for g in grads)))
        bwd += chunked_core(b, chain, groups, heads, f"{prefix}/bwd", *gated, results, d_out=d_out, rows=rows,
                            causal=context.causal_attention, shared=shared)
        replaced += list(zip([o, *grads], _made_by(fwd, [o.name]) + _made_by(bwd, results.values())))
        removed |= gone
        skipping += any(n.name.endswith("/KeysKt") for n in fwd)
        before.setdefault(pv, []).extend(fwd)
        first_backward = next(n for n in graph if n in gone and n in backward)
        before.setdefault(first_backward, []).extend(bwd)
        report.changed += 1
    if report.changed:
        for anchor, nodes in before.items():
            graph.insert_before(anchor, nodes)
        for old, node in replaced:  # the new outputs take the old ones' readers (their names are the same)
            ir.convenience.replace_all_uses_with(old, next(v for v in node.outputs if v.name == old.name))
        graph.remove([n for n in graph if n in removed], safe=True)  # checks that nothing left reads them
    report.details = {"layers": report.changed, "groups": groups, "row_chunks": max(rows, 1),
                      "causal_skip": report.changed > 0 and skipping == report.changed,
                      "frees": "the forward's and the backward's [batch, heads, T, T] tensors but one group's "
                               "rows chunk's"}
    return report


def _made_by(nodes: list, names) -> list:
    """The node of `nodes` that makes each of `names`."""
    by_name = {v.name: node for node in nodes for v in node.outputs}
    return [by_name[name] for name in names]


def _between(graph, start, ends: set, backward: set) -> list:
    """Backward nodes on a path from value `start` to a value in `ends`, in stored order."""
    down = descendants([start], within=backward, stop=ends)
    up = ancestors(ends, within=backward)
    return [n for n in graph if n in down and n in up]


ATTENTION_CHUNKS = GraphPass("attention_chunks", "training", apply,
                             switch=("attention_chunks", "attention_row_chunks"), ir=True)
