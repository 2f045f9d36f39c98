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

Written on onnx_ir (passes/_ir.py).
"""

from __future__ import annotations

import logging
import re

from ._base import SHAPE_OPS, GraphPass, PassContext, PassReport
from ._ir import ancestors, backward_nodes, clone_node, gate_all, insert_groups, redirect

log = logging.getLogger(__name__)

_LAYER = re.compile(r"layers\.(\d+)[./]")


def _layer_of(node) -> int | None:
    m = _LAYER.search(node.name or "")
    return int(m.group(1)) if m else None


def apply(model, context: PassContext) -> PassReport:
    graph = model.graph
    report = PassReport("layer_recompute")
    backward_list = backward_nodes(graph)
    backward = set(backward_list)
    made = {v.name: v for node in graph for v in node.outputs}
    layer_of = {node: _layer_of(node) for node in graph}
    forward = [node for node in graph if node not in backward]
    blocks: dict[int, list] = {}
    for node in forward:
        if layer_of[node] is not None:
            blocks.setdefault(layer_of[node], []).append(node)
    position = {node: i for i, node in enumerate(graph)}
    inserts = []  # (stored index, nodes)
    for layer in sorted(blocks):
        members = set(blocks[layer])
        # The block's output: the last tensor it makes that later blocks (or the final norm) read, with a gradient.
        # (Exporters share constants across blocks, so "read outside the block" alone is not enough.)
        later = [n for n in forward if n not in members and (layer_of[n] is None or layer_of[n] > layer)]
        outputs = [v for v in {v for n in later for v in n.inputs if v is not None and v.producer() in members}
                   if f"{v.name}_grad" in made]
        grads = [made[f"{max(outputs, key=lambda v: position[v.producer()]).name}_grad"]] if outputs else []
        # Tensors of this block that the backward reads (by value), except what later blocks read anyway (the
        # residual out is the next block's kept input; recomputing it would also make the gate wait on itself).
        handed_on = {v for n in later for v in n.inputs}
        read = {v for n in backward_list if n.op_type not in SHAPE_OPS for v in n.inputs
                if v is not None and v.producer() in members and v not in handed_on}
        if not read:
            continue
        # Their ancestors inside the block: what the copy recomputes.
        needed = ancestors(read, within=members)
        copy_nodes = [n for n in blocks[layer] if n in needed]  # stored order
        # What comes in from outside the block (the residual stream, the mask, rotary tables, shapes).
        external = {v for n in copy_nodes for v in n.inputs
                    if v is not None and v.producer() is not None and v.producer() not in members
                    and v.producer() not in backward}
        if not grads or not external:
            why = "no gradient of the block output to gate on" if not grads else "no input from outside the block"
            report.skipped.append(f"layers.{layer}: {why}")
            continue
        prefix = f"/layer_recompute/layers.{layer}"
        renamed, new_nodes = {}, []
        for k, value in enumerate(_to_gate(copy_nodes, external)):
            gate, (gated,) = gate_all(graph, f"{prefix}/in{k}", [value], grads)
            new_nodes += gate
            renamed[value] = gated
        new_nodes += [clone_node(node, renamed, ".layer_recompute", f"{prefix}/{node.name}") for node in copy_nodes]
        readers = [n for n in backward_list if n.op_type not in SHAPE_OPS and any(v in read for v in n.inputs)]
        redirect(readers, renamed, read)
        inserts.append((min(position[r] for r in readers), new_nodes))
        report.changed += 1
    insert_groups(graph, inserts)
    report.details = {"blocks": report.changed, "keeps": "each block's input (residual stream)"}
    return report


def _to_gate(copy_nodes: list, external: set) -> list:
    """The external inputs to gate: enough that every copied node reading an external tensor waits for a gated one,
    directly or through the copy (a node waits for all its inputs, and one gated input also keeps CSE off it). In
    stored (topological) order, a node that does not wait yet gets all its external inputs gated: on the Llama-family
    blocks the residual stream and the rotary tables (unsqueezed before they meet Q); the mask and shared shape
    arithmetic are read as they are (each gate costs three nodes of ORT session memory per layer). By name."""
    gated, waiting = set(), set()  # gated externals; copy outputs that wait for one
    for node in copy_nodes:
        if not any(v in gated or v in waiting for v in node.inputs):
            gated |= {v for v in node.inputs if v in external}
        if any(v in gated or v in waiting for v in node.inputs):
            waiting.update(node.outputs)
    return sorted(gated, key=lambda v: v.name)


LAYER_RECOMPUTE = GraphPass("layer_recompute", "training", apply, switch="recompute_layers", ir=True)
