"""Cheap recompute: a tensor the backward reads that a few cheap ops make from a tensor the backward keeps anyway,
or from a smaller one, is recomputed in the backward instead of kept from the forward.

Two such tensors per decoder layer dominate what the default bundle keeps beside the residual stream:
- the MLP's activation a = act(g) (SiLU, which ORT fuses into QuickGelu): the gradient of a·u reads a, while the
  activation's own gradient reads g, which is kept anyway. Recomputing a from g frees [T, f] per layer.
- grouped-query attention's repeated keys and values (transformers' repeat_kv: Unsqueeze -> Expand -> Reshape, and
  for the keys a Transpose): the attention backward reads K and V repeated to all heads. Keeping them before the
  Expand keeps kv_heads / heads of them (SmolLM2: 3 of 9).
Together 31% of the default bundle's activations at any length (SmolLM2: 1536 + 2 × (576 − 192) of 7,488 floats per
token and layer), for a few elementwise ops and copies per layer in the backward.

A chain is walked up from the kept tensor through CHEAP_OPS (one activation input each; the other inputs are
shapes or axes) to the first tensor the backward keeps anyway, or else to the input of the chain's topmost
Expand. A chain without either would keep a tensor as large as the one it frees: it is left alone.

As in the other recompute passes, the copy's input goes through a gate (_base.gate_after) on a tensor of the
backward that the first reader waits for, so ORT runs the copy right before its reader (not with the forward), and
its common-subexpression elimination cannot merge the copy into the forward twin. The gradients are exact: the
copy runs the same kernels on the same values.

Layer recompute (which runs first) leaves nothing for this pass in the blocks it copies: their tensors are made in
the backward.
"""

from __future__ import annotations

import logging

from ._base import (GraphPass, PassContext, PassReport, backward_nodes, clone_node, gate_after, gate_of,
                    gate_waits_for, producers, run_order, saved_for_backward, view_chain)

log = logging.getLogger(__name__)

# Ops cheap to run again in the backward, each with one activation input (input 0; any other input is a shape or
# axes). Expand is the one that grows its input.
CHEAP_OPS = {"QuickGelu", "Sigmoid", "Tanh", "Relu", "Transpose", "Expand", "Reshape", "Unsqueeze", "Squeeze",
             "Identity", "Flatten"}
_GROWS = {"Expand"}
_MAX_CHAIN = 6


def find_chain(kept: str, prod: dict, saved: dict, backward_ids: set) -> tuple[list, str | None]:
    """The forward nodes (first to last) that make `kept` from a tensor worth keeping instead, and that tensor; or
    ([], None)."""
    chain, name = [], kept
    while len(chain) < _MAX_CHAIN:
        node = prod.get(name)
        if node is None or node.op_type not in CHEAP_OPS or id(node) in backward_ids:
            break
        chain.append(node)
        name = node.input[0]
        if view_chain(name, prod, backward_ids)[-1] in saved:
            return chain[::-1], name  # kept anyway: the copy costs no memory at the turn
    grows = [k for k, node in enumerate(chain) if node.op_type in _GROWS]
    if not grows:
        return [], None
    chain = chain[: grows[-1] + 1]
    return chain[::-1], chain[-1].input[0]


def _gate_on(reader, prod: dict, backward_ids: set, chain_names: set) -> list[str]:
    """Tensors of the backward that `reader` waits for and that have a dynamic shape: what a gate on the copy's
    input may wait for. A reader that is itself a gate waits for what that gate waits for."""
    opener = gate_of(prod, reader.output[0])
    if opener is not None:
        return sorted(gate_waits_for(prod, opener))
    return [t for t in reader.input if t and t not in chain_names and t in prod and id(prod[t]) in backward_ids
            and prod[t].op_type not in ("Shape", "Size", "Constant")]


def apply(model, context: PassContext) -> PassReport:
    report = PassReport("cheap_recompute", freed_per="token")
    backward = backward_nodes(model)
    backward_ids = {id(n) for n in backward}
    prod = producers(model)
    saved = saved_for_backward(model)
    order = {id(n): k for k, n in enumerate(run_order(model))}
    position = {id(n): k for k, n in enumerate(model.graph.node)}
    kinds: dict[str, int] = {}
    inserts = []  # (stored index of the first reader, nodes)
    for kept, readers in sorted(saved.items()):
        chain, source = find_chain(kept, prod, saved, backward_ids)
        if not chain:
            continue
        made = {o for node in chain for o in node.output}
        first = min(readers, key=lambda r: order[id(r)])
        after = _gate_on(first, prod, backward_ids, made | {kept})
        if not after:
            why = f"its first backward reader {first.name} reads no tensor of the backward to gate the copy on"
            log.info("cheap_recompute: leaving %s: %s", kept, why)
            report.skipped.append(f"{kept}: {why}")
            continue
        prefix = f"{chain[-1].name}/CheapRecompute"
        gate, source_gated = gate_after(model, prefix, source, after)
        renamed, suffix = {source: source_gated}, f".recompute{report.changed}"  # chains may share forward nodes
        copies = [clone_node(node, renamed, suffix, f"{prefix}/{node.name.rsplit('/', 1)[-1]}") for node in chain]
        # Readers may read `kept` through views made in the forward (a Reshape of the Expand): copy those views too.
        for reader in readers:
            for k, name in enumerate(reader.input):
                views = view_chain(name, prod, backward_ids)
                if views[-1] != kept:
                    continue
                for view in reversed(views[:-1]):
                    if view not in renamed:
                        node = prod[view]
                        copies.append(clone_node(node, renamed, suffix, f"{prefix}/{node.name.rsplit('/', 1)[-1]}"))
                reader.input[k] = renamed[name]
        inserts.append((min(position[id(r)] for r in readers), gate + copies))
        kind = "+".join(node.op_type for node in chain)
        kinds[kind] = kinds.get(kind, 0) + 1
        report.changed += 1
    # Stored before the first reader (the tensors the gate waits for exist by then); the last index first, so the
    # earlier indices stay valid.
    for at, nodes in sorted(inserts, key=lambda item: -item[0]):
        for offset, node in enumerate(nodes):
            model.graph.node.insert(at + offset, node)
    report.details = {"chains": kinds, "frees": "per layer: the MLP activation, [batch, T, intermediate]; K and V "
                                                "repeated to all heads, less the K and V before the repeat"}
    return report


CHEAP_RECOMPUTE = GraphPass("cheap_recompute", "training", apply)
