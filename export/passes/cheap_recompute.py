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

As in the other recompute passes, the copy's input goes through a gate (_ir.gate_all) on a tensor of the
backward that the first reader waits for, so ORT runs the copy right before its reader (not with the forward), and
its common-subexpression elimination cannot merge the copy into the forward twin. The gradients are exact: the
copy runs the same kernels on the same values.

Layer recompute (which runs first) leaves nothing for this pass in the blocks it copies: their tensors are made in
the backward.

Written on onnx_ir (passes/_ir.py).
"""

from __future__ import annotations

import logging

from ._base import GraphPass, PassContext, PassReport
from ._ir import (backward_nodes, clone_node, gate_all, gate_of, gate_waits_for, insert_groups, run_order,
                  saved_for_backward, view_chain)

log = logging.getLogger(__name__)

# Ops cheap to run again in the backward, each with one activation input (input 0; any other input is a shape or
# axes). Expand is the one that grows its input.
CHEAP_OPS = {"QuickGelu", "Sigmoid", "Tanh", "Relu", "Transpose", "Expand", "Reshape", "Unsqueeze", "Squeeze",
             "Identity", "Flatten"}
_GROWS = {"Expand"}
_MAX_CHAIN = 6


def find_chain(kept, saved: dict, backward: set) -> tuple[list, object]:
    """The forward nodes (first to last) that make the value `kept` from a value worth keeping instead, and that
    value; or ([], None). `saved`: what the backward keeps (saved_for_backward's keys); `backward`: its nodes."""
    chain, value = [], kept
    while len(chain) < _MAX_CHAIN:
        node = value.producer()
        if node is None or node.op_type not in CHEAP_OPS or node in backward:
            break
        chain.append(node)
        value = node.inputs[0]
        if view_chain(value, backward)[-1] in saved:
            return chain[::-1], value  # kept anyway: the copy costs no memory at the turn
    grows = [k for k, node in enumerate(chain) if node.op_type in _GROWS]
    if not grows:
        return [], None
    chain = chain[: grows[-1] + 1]
    return chain[::-1], chain[-1].inputs[0]


def _gate_on(reader, backward: set, chain_values: set) -> list:
    """Values of the backward that `reader` waits for and that have a dynamic shape: what a gate on the copy's input
    may wait for. A reader that is itself a gate waits for what that gate waits for."""
    opener = gate_of(reader.outputs[0])
    if opener is not None:
        return sorted(gate_waits_for(opener), key=lambda v: v.name)
    return [v for v in reader.inputs if v is not None and v.name and v not in chain_values
            and v.producer() in backward and v.producer().op_type not in ("Shape", "Size", "Constant")]


def apply(model, context: PassContext) -> PassReport:
    graph = model.graph
    report = PassReport("cheap_recompute", freed_per="token")
    backward_list = backward_nodes(graph)
    backward = set(backward_list)
    saved = saved_for_backward(graph, backward_list)
    order = {node: k for k, node in enumerate(run_order(graph))}
    position = {node: k for k, node in enumerate(graph)}
    kinds: dict[str, int] = {}
    inserts = []  # (stored index of the first reader, nodes)
    for kept, readers in sorted(saved.items(), key=lambda item: item[0].name):
        chain, source = find_chain(kept, saved, backward)
        if not chain:
            continue
        made = {o for node in chain for o in node.outputs}
        first = min(readers, key=order.__getitem__)
        after = _gate_on(first, backward, made | {kept})
        if not after:
            why = f"its first backward reader {first.name} reads no tensor of the backward to gate the copy on"
            log.info("cheap_recompute: leaving %s: %s", kept.name, why)
            report.skipped.append(f"{kept.name}: {why}")
            continue
        prefix = f"{chain[-1].name}/CheapRecompute"
        gate, (source_gated,) = gate_all(graph, prefix, [source], after)
        renamed, suffix = {source: source_gated}, f".recompute{report.changed}"  # chains may share forward nodes
        copies = [clone_node(node, renamed, suffix, f"{prefix}/{node.name.rsplit('/', 1)[-1]}") for node in chain]
        # Readers may read `kept` through views made in the forward (a Reshape of the Expand): copy those views too.
        for reader in readers:
            for k, value in enumerate(reader.inputs):
                views = view_chain(value, backward) if value is not None else []
                if not views or views[-1] is not kept:
                    continue
                for view in reversed(views[:-1]):
                    if view not in renamed:
                        node = view.producer()
                        copies.append(clone_node(node, renamed, suffix, f"{prefix}/{node.name.rsplit('/', 1)[-1]}"))
                reader.replace_input_with(k, renamed[value])
        inserts.append((min(position[r] for r in readers), gate + copies))
        kind = "+".join(node.op_type for node in chain)
        kinds[kind] = kinds.get(kind, 0) + 1
        report.changed += 1
    # Stored right before the first stored reader (the tensors the gate waits for exist by then).
    insert_groups(graph, inserts)
    report.details = {"chains": kinds, "frees": "per layer: the MLP activation, [batch, T, intermediate]; K and V "
                                                "repeated to all heads, less the K and V before the repeat"}
    return report


CHEAP_RECOMPUTE = GraphPass("cheap_recompute", "training", apply, ir=True)
