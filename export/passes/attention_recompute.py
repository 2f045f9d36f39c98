"""Attention recompute: the backward recomputes each layer's attention probabilities instead of keeping them.

Eager attention computes P = Softmax(mask + s·Q·Kᵀ) ([batch, heads, T, T] per layer) and ORT's backward reads P
twice (dV = Pᵀ·dO and SoftmaxGrad(dP, P)), so every layer's P outlives the forward: H·T² floats per layer, the
largest saved tensor from ~500 tokens on. The pass gives those backward readers a copy of the chain

    MatMul(Q, Kᵀ) -> [Mul/Div by the scale] -> [Add the mask] -> Softmax

computed in the backward from Q, Kᵀ and the mask, which the backward keeps anyway (the MatMul's gradient reads Q
and Kᵀ; the mask is one [T, T] tensor for all layers). The forward P then dies inside the forward. The gradients
are exact: the copy computes the same values with the same kernels.

Two things would undo it, and the pass guards against both:
- ORT's scheduler could run the copy early (its inputs exist in the forward) and keep P' alive as long as P was.
  The copy's Q input goes through a gate, Q + 0·Size(dO) with dO the gradient arriving at the attention output,
  so it cannot start before the backward reaches that layer.
- ORT's common-subexpression elimination would merge a copy with identical inputs back into the forward. The gated
  Q makes every node of the copy differ from its forward twin.
A test checks both on the graph ORT optimises and runs, not only on the stored one.
"""

from __future__ import annotations

import logging

from ._base import (GraphPass, PassContext, PassReport, clone_node, consumers, gate_after, producers,
                    saved_for_backward)

log = logging.getLogger(__name__)

# Ops allowed between the score MatMul and the Softmax (scale, mask, dtype casts); each has one input on the chain.
_CHAIN_OPS = {"Add", "Sub", "Mul", "Div", "Where", "Cast"}
_MATMUL_OPS = {"MatMul", "FusedMatMul"}
_MAX_CHAIN = 6


def _scope(name: str) -> str:
    return name.rsplit("/", 1)[0]


def find_chain(softmax, prod) -> tuple[list, str | None]:
    """The nodes from the score MatMul up to the Softmax (bottom first), or ([], why not)."""
    chain, node, scope = [softmax], softmax, _scope(softmax.name)
    while len(chain) <= _MAX_CHAIN:
        # The chain input is the one produced in the same module (the mask and the scale come from elsewhere).
        ups = [prod[i] for i in node.input if i in prod and _scope(prod[i].name) == scope]
        if len(ups) != 1:
            return [], f"{len(ups)} inputs of {node.name} come from the attention module (expected 1)"
        node = ups[0]
        chain.append(node)
        if node.op_type in _MATMUL_OPS:
            return chain[::-1], None
        if node.op_type not in _CHAIN_OPS:
            return [], f"{node.op_type} between the scores and the Softmax is not recomputable here"
    return [], "no score MatMul within a few nodes of the Softmax"


def apply(model, context: PassContext) -> PassReport:
    report = PassReport("attention_recompute")
    prod, cons = producers(model), consumers(model)
    saved = saved_for_backward(model)
    graph_names = {o for n in model.graph.node for o in n.output}
    for softmax in [n for n in model.graph.node if n.op_type == "Softmax"]:
        probs = softmax.output[0]
        readers = saved.get(probs, [])
        if not readers:
            continue  # nothing in the backward keeps it (e.g. the eval graph, or already recomputed)
        chain, why_not = find_chain(softmax, prod)
        forward_users = [n for n in cons.get(probs, []) if n not in readers]
        if not why_not and len(forward_users) != 1:
            why_not = f"{len(forward_users)} forward readers of the probabilities (expected the P·V MatMul)"
        if not why_not:
            d_out = f"{forward_users[0].output[0]}_grad"  # ORT names the gradient of tensor t "t_grad"
            if d_out not in graph_names:
                why_not = f"no gradient tensor {d_out} to gate the recompute on"
        if why_not:
            log.info("attention_recompute: leaving %s: %s", softmax.name, why_not)
            report.skipped.append(f"{softmax.name}: {why_not}")
            continue

        prefix = _scope(softmax.name) + "/Recompute"
        matmul = chain[0]
        gate, q_gated = gate_after(model, prefix, matmul.input[0], d_out)
        renamed = {matmul.input[0]: q_gated}
        copies = [clone_node(node, renamed, ".recompute", f"{prefix}/{node.name.rsplit('/', 1)[-1]}")
                  for node in chain]
        # Every backward reader of a chain tensor (the probabilities, and any intermediate the backward reads)
        # takes the recomputed copy instead.
        redirected = {id(r): r for t in renamed if t in saved and t != matmul.input[0] for r in saved[t]}
        for reader in redirected.values():
            for k, name in enumerate(reader.input):
                if name in renamed and name != matmul.input[0]:
                    reader.input[k] = renamed[name]
        # Stored before the first reader so the node list stays topologically sorted (dO exists by then).
        at = min(list(model.graph.node).index(r) for r in redirected.values())
        for offset, node in enumerate(gate + copies):
            model.graph.node.insert(at + offset, node)
        report.changed += 1
    # What it frees depends on batch, heads and length: record per layer and let the caller scale it.
    report.details = {"layers": report.changed, "frees": "one [batch, heads, T, T] float32 tensor per layer"}
    return report


ATTENTION_RECOMPUTE = GraphPass("attention_recompute", "training", apply,
                                switch="recompute_attention")
