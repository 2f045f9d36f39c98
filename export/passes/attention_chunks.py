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
"""

from __future__ import annotations

import logging

import numpy as np

from ._base import GraphPass, PassContext, PassReport, backward_nodes, consumers, gate_after, producers
from .attention_recompute import find_chain

log = logging.getLogger(__name__)

MS = "com.microsoft"
_SCALE_OPS = {"Mul", "Div"}
_MASK_OPS = {"Add"}
HEADS = -3  # the head axis of Q, V, dO [..., heads, T, head_dim] and Kᵀ [..., heads, head_dim, T]


def find(model):
    """For each Softmax: (softmax, (chain [score MatMul .. Softmax], P·V MatMul), None) or (softmax, None, why not)."""
    prod, cons = producers(model), consumers(model)
    for softmax in [n for n in model.graph.node if n.op_type == "Softmax"]:
        chain, why_not = find_chain(softmax, prod)
        if why_not:
            yield softmax, None, why_not
            continue
        readers = cons.get(softmax.output[0], [])
        pv = [n for n in readers if n.op_type == "MatMul" and n.input[0] == softmax.output[0]]
        if len(pv) != 1:
            yield softmax, None, "no single P·V MatMul reads the probabilities"
            continue
        yield softmax, (chain, pv[0]), None


def check(chain, pv, inits: dict, prod: dict, graph_names: set) -> str | None:
    """None if the layer's core can be chunked, else why not. Between the scores and the Softmax only a scale by a
    constant (Mul/Div) and an added mask are supported; ORT's gradients of Q, Kᵀ and V must each come from one
    matrix product (no other differentiable reader)."""
    matmul = chain[0]
    if matmul.op_type != "MatMul":
        return f"the scores come from {matmul.op_type}, not MatMul"
    for k, node in enumerate(chain[1:-1]):
        const = _constant_input(node, chain[k].output[0])
        if node.op_type not in _SCALE_OPS | _MASK_OPS:
            return f"{node.op_type} between the scores and the Softmax (only a scale and a mask are chunked)"
        if node.op_type in _SCALE_OPS and (const is None or not _scalar_constant(const, inits)):
            return f"{node.op_type} by a non-constant scale"
        if node.op_type == "Div" and node.input[0] != chain[k].output[0]:
            return "the scores divide a constant"
    for t in (matmul.input[0], matmul.input[1], pv.input[1], pv.output[0]):
        if f"{t}_grad" not in graph_names:
            return f"no gradient tensor {t}_grad (ORT names the gradient of t 't_grad')"
    for t in (matmul.input[0], matmul.input[1], pv.input[1]):
        if prod[f"{t}_grad"].op_type not in ("MatMul", "FusedMatMul"):
            return f"the gradient of {t} is a {prod[f'{t}_grad'].op_type} (another reader needs a gradient too)"
    return None


def _constant_input(node, chain_input: str) -> str | None:
    others = [i for i in node.input if i != chain_input]
    return others[0] if len(others) == 1 else None


def _scalar_constant(name: str, inits: dict) -> bool:
    from onnx import numpy_helper

    return name in inits and numpy_helper.to_array(inits[name]).size == 1


def _split_sizes(model, heads: int, groups: int) -> str:
    from onnx import numpy_helper

    name = f"passes.attention_chunks.sizes{heads}x{groups}"
    if name not in {i.name for i in model.graph.initializer}:
        sizes = np.array([heads // groups + (1 if g < heads % groups else 0) for g in range(groups)], np.int64)
        model.graph.initializer.append(numpy_helper.from_array(sizes, name))
    return name


def chunked_core(model, chain, groups: int, heads: int, prefix: str, q: str, kt: str, v: str,
                 d_out: str | None = None) -> tuple[list, dict[str, list[str]]]:
    """Nodes computing the attention core of `chain` in `groups` groups of heads, one after the other, from q, kt, v
    ([batch, heads, ...]); and the per-group outputs: {"o"} for the forward (d_out None), else {"dq", "dkt", "dv"}
    from the output gradient d_out."""
    from onnx import helper

    sizes = _split_sizes(model, heads, groups)
    p = lambda s: f"{prefix}/{s}"  # noqa: E731
    inputs = [(q, "q"), (kt, "kt"), (v, "v")] + ([(d_out, "do")] if d_out else [])
    nodes = [helper.make_node("Split", [t, sizes], [p(f"{tag}{g}") for g in range(groups)], name=p(f"Split_{tag}"),
                              axis=HEADS) for t, tag in inputs]
    softmax = chain[-1]
    axis = next((a.i for a in softmax.attribute if a.name == "axis"), -1)
    outs: dict[str, list[str]] = {"o": [], "dq": [], "dkt": [], "dv": []}
    previous = None
    for g in range(groups):
        qg = p(f"q{g}")
        if previous is not None:  # one group after the other: this group's input waits for the last one's result
            gate, qg = gate_after(model, p(f"g{g}"), qg, previous)
            nodes += gate
        x = p(f"g{g}/scores")
        nodes.append(helper.make_node("MatMul", [qg, p(f"kt{g}")], [x], name=p(f"g{g}/Scores")))
        scales = []
        for k, node in enumerate(chain[1:-1]):  # the scale and the mask, as the layer applies them
            out = p(f"g{g}/{node.op_type}{k}")
            ins = [x if i == chain[k].output[0] else i for i in node.input]
            nodes.append(helper.make_node(node.op_type, ins, [out], name=out))
            if node.op_type in _SCALE_OPS:
                scales.append((node.op_type, _constant_input(node, chain[k].output[0])))
            x = out
        probs = p(f"g{g}/probs")
        nodes.append(helper.make_node("Softmax", [x], [probs], name=p(f"g{g}/Softmax"), axis=axis))
        if d_out is None:
            o = p(f"g{g}/o")
            nodes.append(helper.make_node("MatMul", [probs, p(f"v{g}")], [o], name=p(f"g{g}/PV")))
            outs["o"].append(o)
            previous = o
            continue
        dog = p(f"do{g}")
        dv, dp, ds = p(f"g{g}/dv"), p(f"g{g}/dp"), p(f"g{g}/ds")
        nodes += [
            helper.make_node("FusedMatMul", [probs, dog], [dv], name=p(f"g{g}/dV"), domain=MS, transA=1, transB=0,
                             alpha=1.0),
            helper.make_node("FusedMatMul", [dog, p(f"v{g}")], [dp], name=p(f"g{g}/dP"), domain=MS, transA=0,
                             transB=1, alpha=1.0),
            helper.make_node("SoftmaxGrad_13", [dp, probs], [ds], name=p(f"g{g}/SoftmaxGrad"), domain=MS, axis=axis),
        ]
        for k, (op, const) in enumerate(reversed(scales)):  # the mask's Add passes the gradient through
            scaled = p(f"g{g}/ds_scaled{k}")
            nodes.append(helper.make_node(op, [ds, const], [scaled], name=p(f"g{g}/dScale{k}")))
            ds = scaled
        dq, dkt = p(f"g{g}/dq"), p(f"g{g}/dkt")
        nodes += [
            helper.make_node("FusedMatMul", [ds, p(f"kt{g}")], [dq], name=p(f"g{g}/dQ"), domain=MS, transA=0,
                             transB=1, alpha=1.0),
            helper.make_node("FusedMatMul", [qg, ds], [dkt], name=p(f"g{g}/dKt"), domain=MS, transA=1, transB=0,
                             alpha=1.0),
        ]
        outs["dq"].append(dq)
        outs["dkt"].append(dkt)
        outs["dv"].append(dv)
        previous = dq
    return nodes, outs


def apply(model, context: PassContext) -> PassReport:
    from onnx import helper

    report = PassReport("attention_chunks")
    heads = context.attention_heads
    groups = min(context.attention_chunks, heads)
    if groups < 2:
        report.skipped.append(f"--attention-chunks {context.attention_chunks} with {heads} heads: attention runs "
                              f"whole")
        return report
    inits = {i.name: i for i in model.graph.initializer}
    prod = producers(model)
    graph_names = set(prod)
    backward_list = backward_nodes(model)  # held: protobuf node ids are only stable while the nodes are alive
    backward = {id(n) for n in backward_list}
    removed: set[int] = set()
    before: dict[int, list] = {}  # id(anchor node) -> new nodes to put before it
    for softmax, match, why_not in list(find(model)):
        if match is None or (why_not := check(*match, inits, prod, graph_names)):
            log.info("attention_chunks: leaving %s: %s", softmax.name, why_not)
            report.skipped.append(f"{softmax.name}: {why_not}")
            continue
        chain, pv = match
        q, kt, v, o = chain[0].input[0], chain[0].input[1], pv.input[1], pv.output[0]
        grads = [f"{q}_grad", f"{kt}_grad", f"{v}_grad"]
        # What goes: the forward core and ORT's backward of it (every backward node on a path from dO to a grad),
        # and Shape/Size nodes that only measured those tensors.
        gone_nodes = [*chain, pv, *_between(model, f"{o}_grad", set(grads), backward)]
        gone_outputs = {t for n in gone_nodes for t in n.output} - set(grads) - {o}
        measures = [n for n in model.graph.node if n.op_type in ("Shape", "Size")
                    and any(i in gone_outputs for i in n.input)]
        gone = {id(n) for n in gone_nodes + measures}
        gone_outputs |= {t for n in measures for t in n.output}
        reader = next((n for n in model.graph.node if id(n) not in gone and any(i in gone_outputs for i in n.input)),
                      None)
        if reader is not None:
            report.skipped.append(f"{softmax.name}: {reader.name} reads an attention intermediate")
            continue
        prefix = softmax.name.rsplit("/", 1)[0] + "/AttentionChunks"
        fwd, outs = chunked_core(model, chain, groups, heads, f"{prefix}/fwd", q, kt, v)
        fwd.append(helper.make_node("Concat", outs["o"], [o], name=f"{prefix}/fwd/ConcatO", axis=HEADS))
        # The backward starts once dO exists: Q, Kᵀ and V go through a gate on it (which also keeps CSE away).
        bwd, gated = [], []
        for k, t in enumerate((q, kt, v)):
            gate, name = gate_after(model, f"{prefix}/bwd/in{k}", t, f"{o}_grad")
            bwd += gate
            gated.append(name)
        core, outs = chunked_core(model, chain, groups, heads, f"{prefix}/bwd", *gated, d_out=f"{o}_grad")
        bwd += core
        for grad, key in zip(grads, ("dq", "dkt", "dv")):
            bwd.append(helper.make_node("Concat", outs[key], [grad], name=f"{prefix}/bwd/Concat_{key}", axis=HEADS))
        removed |= gone
        before.setdefault(id(pv), []).extend(fwd)
        first_backward = next(n for n in model.graph.node if id(n) in gone and id(n) in backward)
        before.setdefault(id(first_backward), []).extend(bwd)
        report.changed += 1
    if report.changed:
        nodes = []
        for node in model.graph.node:
            nodes.extend(before.get(id(node), []))
            if id(node) not in removed:
                nodes.append(node)
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    report.details = {"layers": report.changed, "groups": groups,
                      "frees": "the forward's and the backward's [batch, heads, T, T] tensors but one group's"}
    return report


def _between(model, start: str, ends: set[str], backward: set[int]) -> list:
    """Backward nodes on a path from tensor `start` to a tensor in `ends`, in stored order."""
    cons, prod = consumers(model), producers(model)
    down, stack = set(), [start]
    while stack:
        for node in cons.get(stack.pop(), []):
            if id(node) in backward and id(node) not in down:
                down.add(id(node))
                stack.extend(t for t in node.output if t not in ends)
    up, stack = set(), list(ends)
    while stack:
        node = prod.get(stack.pop())
        if node is not None and id(node) in backward and id(node) not in up:
            up.add(id(node))
            stack.extend(node.input)
    return [n for n in model.graph.node if id(n) in down and id(n) in up]


ATTENTION_CHUNKS = GraphPass("attention_chunks", "training", apply, help=__doc__.splitlines()[0],
                             switch="attention_chunks")
