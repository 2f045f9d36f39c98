"""Layer recompute (checkpointing): each decoder block keeps only its input; the backward recomputes the rest.

For block L, every tensor the block's forward makes and its backward reads (attention Q/K/V and probabilities, MLP
activations, norm statistics, adapter inputs or their LARS projections) is replaced, for the backward, by a copy
computed from the block's input when the backward reaches the block. What stays alive from forward to backward is
one [batch, T, hidden] residual per block (plus what all blocks share: the mask, the rotary tables). The cost is
one more forward of every block per step.

How it composes with the other passes:
- attention recompute: subsumed (the block copy recomputes the probabilities too); both may be on.
- LARS: with blocks recomputed, the adapter inputs exist again in the backward, so LARS no longer saves memory; its
  projection is recomputed like any other tensor and the gradient stays the LARS approximation. Use exact LoRA
  (--lars-basis none) with --recompute-layers unless the approximation is wanted for itself.

The copy's inputs from outside the block (the residual stream) pass through a gate on the gradient of the block's
output, so ORT cannot run the copy early, and common-subexpression elimination cannot merge it into the forward:
enough of them that every copied node waits for a gated tensor (what all blocks share is read ungated).
"""

from __future__ import annotations

import logging
import re

from ._base import (SHAPE_OPS, GraphPass, PassContext, PassReport, ancestors, backward_nodes, clone_node, gate_after,
                    producers)

log = logging.getLogger(__name__)

_LAYER = re.compile(r"layers\.(\d+)[./]")


def _layer_of(node) -> int | None:
    m = _LAYER.search(node.name)
    return int(m.group(1)) if m else None


def apply(model, context: PassContext) -> PassReport:
    report = PassReport("layer_recompute")
    backward = backward_nodes(model)
    backward_ids = {id(n) for n in backward}
    prod = producers(model)
    graph_inputs = {i.name for i in model.graph.input} | {i.name for i in model.graph.initializer}
    graph_names = {o for n in model.graph.node for o in n.output}
    layer_of = {id(n): _layer_of(n) for n in model.graph.node}
    forward = [n for n in model.graph.node if id(n) not in backward_ids]
    blocks: dict[int, list] = {}
    for node in forward:
        if layer_of[id(node)] is not None:
            blocks.setdefault(layer_of[id(node)], []).append(node)
    position = {id(n): i for i, n in enumerate(model.graph.node)}
    inserts = []  # (index, nodes)
    for layer in sorted(blocks):
        members = {id(n) for n in blocks[layer]}
        # The block's output: the last tensor it makes that later blocks (or the final norm) read, with a gradient.
        # (Exporters share constants across blocks, so "read outside the block" alone is not enough.)
        later = [n for n in forward if id(n) not in members and (layer_of[id(n)] is None or layer_of[id(n)] > layer)]
        outputs = [t for t in {t for n in later for t in n.input if t in prod and id(prod[t]) in members}
                   if f"{t}_grad" in graph_names]
        grads = [f"{max(outputs, key=lambda t: position[id(prod[t])])}_grad"] if outputs else []
        # Tensors of this block that the backward reads (by value), except what later blocks read anyway (the
        # residual out is the next block's kept input; recomputing it would also make the gate wait on itself).
        handed_on = {t for n in later for t in n.input}
        read = {t for n in backward if n.op_type not in SHAPE_OPS for t in n.input
                if t in prod and id(prod[t]) in members and t not in handed_on}
        if not read:
            continue
        # Their ancestors inside the block: what the copy recomputes.
        needed = ancestors(read, prod, within=members)
        copy_nodes = [n for n in blocks[layer] if id(n) in needed]  # stored order
        # What comes in from outside the block (the residual stream, the mask, rotary tables, shapes).
        external = {t for n in copy_nodes for t in n.input
                    if t and t not in graph_inputs and t in prod and id(prod[t]) not in members
                    and id(prod[t]) not in backward_ids}
        if not grads or not external:
            why = "no gradient of the block output to gate on" if not grads else "no input from outside the block"
            report.skipped.append(f"layers.{layer}: {why}")
            continue
        prefix = f"/layer_recompute/layers.{layer}"
        renamed, new_nodes = {}, []
        for k, t in enumerate(_to_gate(copy_nodes, external)):
            gate, gated = gate_after(model, f"{prefix}/in{k}", t, grads[0])
            new_nodes += gate
            renamed[t] = gated
        new_nodes += [clone_node(node, renamed, ".layer_recompute", f"{prefix}/{node.name}") for node in copy_nodes]
        readers = [n for n in backward if n.op_type not in SHAPE_OPS and any(t in read for t in n.input)]
        for reader in readers:
            for k, t in enumerate(reader.input):
                if t in read:
                    reader.input[k] = renamed[t]
        inserts.append((min(position[id(r)] for r in readers), new_nodes))
        report.changed += 1
    for at, new_nodes in sorted(inserts, key=lambda x: -x[0]):  # from the end, so indices stay valid
        for offset, node in enumerate(new_nodes):
            model.graph.node.insert(at + offset, node)
    report.details = {"blocks": report.changed, "keeps": "each block's input (residual stream)"}
    return report


def _to_gate(copy_nodes: list, external: set[str]) -> list[str]:
    """The external inputs to gate: enough that every copied node reading an external tensor waits for a gated one,
    directly or through the copy (a node waits for all its inputs, and one gated input also keeps CSE off it). In
    stored (topological) order, a node that does not wait yet gets all its external inputs gated: on the Llama-family
    blocks the residual stream and the rotary tables (unsqueezed before they meet Q); the mask and shared shape
    arithmetic are read as they are (each gate costs three nodes of ORT session memory per layer)."""
    gated, waiting = set(), set()  # gated externals; copy outputs that wait for one
    for node in copy_nodes:
        if not any(t in gated or t in waiting for t in node.input):
            gated |= {t for t in node.input if t in external}
        if any(t in gated or t in waiting for t in node.input):
            waiting.update(node.output)
    return sorted(gated)


LAYER_RECOMPUTE = GraphPass("layer_recompute", "training", apply,
                            switch="recompute_layers")
