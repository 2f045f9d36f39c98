"""Dequantize at use: each reader of a dequantized frozen matrix gets its own copy, made just before it runs.

quantize_frozen dequantizes each stored matrix for its forward reader, gated on that reader's input. ORT's
backward then reads the same float32 tensor (dx = dy·W needs W), and so do the copies other passes make (the
chunked loss reads the output projection once per chunk, forward and backward): each extra reader would keep the
float32 matrix alive from the forward to its own turn, which puts every layer's weights back in memory at the
peak. The pass gives every reader other than the one the dequantization was made for its own copy of the
computation, gated on one of that reader's own inputs (in the backward, a gradient), so the copy runs when the
reader is about to, and dies with it. Run last: it must see the readers every other pass adds.

It changes no value: each copy computes the same float32 matrix from the same stored tensors.
"""

from __future__ import annotations

import logging

from ._base import GraphPass, PassContext, PassReport, backward_nodes, clone_node, consumers, producers
from .quantize_frozen import dequantized_weights

log = logging.getLogger(__name__)


def gate_input(reader, weight: str, prod: dict, cons: dict, backward: set) -> str | None:
    """A tensor the reader waits for besides the weight (a gradient for a backward reader), looking one node
    further when the reader reads only the weight (e.g. a Transpose of it)."""
    for node in [reader, *cons.get(reader.output[0], [])]:
        inputs = [i for i in node.input if i and i != weight and i not in reader.output and i in prod]
        preferred = [i for i in inputs if id(prod[i]) in backward] if id(reader) in backward else []
        if preferred or inputs:
            return (preferred or inputs)[0]
    return None


def apply(model, context: PassContext) -> PassReport:
    report = PassReport("dequantize_at_use")
    weights = dequantized_weights(model)
    if not weights:
        return report
    prod, cons = producers(model), consumers(model)
    backward_list = backward_nodes(model)  # held: node ids are only stable while the wrappers are alive
    backward = {id(n) for n in backward_list}
    position = {id(n): i for i, n in enumerate(model.graph.node)}
    inserts, dead = [], []
    for weight, (chain, gate_on) in weights.items():
        # The reader the dequantization was made for reads its gate tensor too; every other reader gets a copy.
        readers = cons.get(weight, [])
        others = [r for r in readers if gate_on not in r.input]
        for reader in others:
            after = gate_input(reader, weight, prod, cons, backward)
            if after is None:
                report.skipped.append(f"{reader.name}: no input of its own to gate a copy of {weight} on")
                continue
            renamed = {gate_on: after}
            # Unique per copy: ORT's CSE may have merged the gates of weights that share an input (q, k, v), so
            # chains can share nodes.
            suffix = f".use{report.changed}"
            copies = [clone_node(node, renamed, suffix, f"{node.name}{suffix}") for node in chain]
            reader.input[:] = [renamed[weight] if i == weight else i for i in reader.input]
            inserts.append((position[id(reader)], copies))
            report.changed += 1
        if len(others) == len(readers):  # no reader left on the original (its reader was replaced by a pass)
            dead.extend(chain)
    for at, nodes in sorted(inserts, key=lambda x: -x[0]):  # from the end, so indices stay valid
        for offset, node in enumerate(nodes):
            model.graph.node.insert(at + offset, node)
    for node in dead:
        model.graph.node.remove(node)
    report.details = {"copies": report.changed, "dropped_unread": len(dead)}
    return report


DEQUANTIZE_AT_USE = GraphPass("dequantize_at_use", "training", apply, help=__doc__.splitlines()[0],
                              switch="quantize_weights")
