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

Written on onnx_ir (passes/_ir.py).
"""

from __future__ import annotations

import logging

from ._base import GraphPass, PassContext, PassReport
from ._ir import clone_node, gate_all, redirect, saved_for_backward

log = logging.getLogger(__name__)

# Ops allowed between the score MatMul and the Softmax (scale, mask, dtype casts); each has one input on the chain.
_CHAIN_OPS = {"Add", "Sub", "Mul", "Div", "Where", "Cast"}
_MATMUL_OPS = {"MatMul", "FusedMatMul"}
_MAX_CHAIN = 6


def _scope(name: str) -> str:
    return (name or "").rsplit("/", 1)[0]


def find_chain(softmax) -> tuple[list, str | None]:
    """The nodes from the score MatMul up to the Softmax (bottom first), or ([], why not)."""
    chain, node, scope = [softmax], softmax, _scope(softmax.name)
    while len(chain) <= _MAX_CHAIN:
        # The chain input is the one produced in the same module (the mask and the scale come from elsewhere).
        ups = [v.producer() for v in node.inputs
               if v is not None and v.producer() is not None and _scope(v.producer().name) == scope]
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
    graph = model.graph
    report = PassReport("attention_recompute")
    saved = saved_for_backward(graph)
    made = {v.name: v for node in graph for v in node.outputs}
    for softmax in [n for n in graph if n.op_type == "Softmax"]:
        probs = softmax.outputs[0]
        readers = saved.get(probs, [])
        if not readers:
            continue  # nothing in the backward keeps it (e.g. the eval graph, or already recomputed)
        chain, why_not = find_chain(softmax)
        forward_users = [u.node for u in probs.uses() if u.node not in readers]
        if not why_not and len(forward_users) != 1:
            why_not = f"{len(forward_users)} forward readers of the probabilities (expected the P·V MatMul)"
        if not why_not:
            d_out = f"{forward_users[0].outputs[0].name}_grad"  # ORT names the gradient of tensor t "t_grad"
            if d_out not in made:
                why_not = f"no gradient tensor {d_out} to gate the recompute on"
        if why_not:
            log.info("attention_recompute: leaving %s: %s", softmax.name, why_not)
            report.skipped.append(f"{softmax.name}: {why_not}")
            continue

        prefix = _scope(softmax.name) + "/Recompute"
        matmul = chain[0]
        q = matmul.inputs[0]
        gate, (q_gated,) = gate_all(graph, prefix, [q], [made[d_out]])
        renamed = {q: q_gated}
        copies = [clone_node(node, renamed, ".recompute", f"{prefix}/{node.name.rsplit('/', 1)[-1]}")
                  for node in chain]
        # Every backward reader of a chain tensor (the probabilities, and any intermediate the backward reads)
        # takes the recomputed copy instead.
        redirected = {r: None for t in renamed if t in saved and t is not q for r in saved[t]}
        redirect(redirected, renamed, renamed.keys() - {q})
        # Stored before the first reader so the node list stays topologically sorted (dO exists by then).
        graph.insert_before(next(n for n in graph if n in redirected), gate + copies)
        report.changed += 1
    # What it frees depends on batch, heads and length: record per layer and let the caller scale it.
    report.details = {"layers": report.changed, "frees": "one [batch, heads, T, T] float32 tensor per layer"}
    return report


ATTENTION_RECOMPUTE = GraphPass("attention_recompute", "training", apply, switch="recompute_attention", ir=True)
