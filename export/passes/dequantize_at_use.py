"""Dequantize at use: each reader of a dequantized frozen matrix gets its own copy, made just before it runs.

quantize_frozen dequantizes each stored matrix for its forward reader, gated on that reader's input. ORT's
backward then reads the same float32 tensor (dx = dy·W needs W), and so do the copies other passes make (the
chunked loss reads the output projection once per chunk, forward and backward): each extra reader would keep the
float32 matrix alive from the forward to its own turn, which puts every layer's weights back in memory at the
peak. The pass gives every reader other than the one the dequantization was made for its own copy of the
computation, gated on one of that reader's own inputs (in the backward, a gradient), so the copy runs when the
reader is about to, and dies with it. Readers that run one after the other in one phase (the chunked loss'
chunks) share one copy, made when the first of them is about to run: one dequantization of the output projection
per phase instead of one per chunk. "One after the other" is judged in the order ORT runs the graph
(passes._base.run_order): no other dequantized matrix is read in between. A recomputed layer's forward reader and
its backward reader are both in the backward, but the layer's whole backward runs between them: sharing one copy
there kept all seven of a layer's matrices alive through its backward (232 MB on Llama-3.2-1B), so each gets its
own. Run last: it must see the readers every other pass adds.

It changes no value: each copy computes the same float32 matrix from the same stored tensors.
"""

from __future__ import annotations

import bisect
import logging

from ._base import (VIEW_OPS, GraphPass, PassContext, PassReport, backward_nodes, clone_node, consumers,
                    producers, run_order)
from ._dequantized import dequantized_weights

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


def _upstream(tensor: str, prod: dict, region: set, memo: dict) -> frozenset:
    """Tensors `tensor` depends on through nodes of `region` (ids), itself included."""
    if tensor in memo:
        return memo[tensor]
    out, stack = {tensor}, [tensor]
    while stack:
        node = prod.get(stack.pop())
        if node is None or id(node) not in region:
            continue
        for t in node.input:
            if t and t not in out:
                if t in memo:
                    out |= memo[t]
                else:
                    out.add(t)
                    stack.append(t)
    memo[tensor] = frozenset(out)
    return memo[tensor]


def _first_of(gates: list[str], readers: list, prod: dict, region: set, memo: dict) -> str | None:
    """A gate tensor every reader depends on (so a copy made when it exists serves them all), or None."""
    needs = [frozenset().union(*(_upstream(t, prod, region, memo) for t in r.input if t)) for r in readers]
    return next((g for g in gates if g is not None and all(g in n for n in needs)), None)


def most_alive(model) -> int:
    """The largest number of dequantized matrices alive at once when ORT runs the graph (in run_order): a matrix
    lives from the last node of its computation to its last reader, looking through views and transposes of it."""
    order = run_order(model)
    at = {id(n): k for k, n in enumerate(order)}
    cons = consumers(model)
    events = []
    for name, (chain, _gate) in dequantized_weights(model).items():
        readers, stack = [], [name]
        while stack:
            current = stack.pop()
            for node in cons.get(current, []):
                if node.op_type in (*VIEW_OPS, "Transpose") and node.input[0] == current:
                    stack.append(node.output[0])
                else:
                    readers.append(node)
        if readers:
            events += [(max(at[id(n)] for n in chain), 1), (max(at[id(r)] for r in readers), -1)]
    alive = peak = 0
    for _, change in sorted(events):  # at one position a free (-1) sorts before a make
        alive += change
        peak = max(peak, alive)
    return peak


def apply(model, context: PassContext) -> PassReport:
    report = PassReport("dequantize_at_use")
    weights = dequantized_weights(model)
    if not weights:
        return report
    prod, cons = producers(model), consumers(model)
    order = run_order(model)  # held, as backward_list: node ids are only stable while the wrappers are alive
    run_at = {id(n): k for k, n in enumerate(order)}
    read_at = sorted(run_at[id(r)] for w in weights for r in cons.get(w, []))
    backward_list = backward_nodes(model)
    backward = {id(n) for n in backward_list}
    everything = {id(n) for n in model.graph.node}
    position = {id(n): i for i, n in enumerate(model.graph.node)}
    memo: dict = {}
    inserts, dead, shared = [], [], 0

    def copy_for(readers: list, weight: str, chain: list, gate_on: str, after: str) -> None:
        suffix = f".use{report.changed}"  # unique per copy: ORT's CSE may have merged gates, so chains share nodes
        renamed = {gate_on: after}
        copies = [clone_node(node, renamed, suffix, f"{node.name}{suffix}") for node in chain]
        for reader in readers:
            reader.input[:] = [renamed[weight] if i == weight else i for i in reader.input]
        inserts.append((min(position[id(r)] for r in readers), copies))
        report.changed += 1

    def one_after_the_other(group: list) -> bool:
        """No other dequantized matrix is read between the group's first and last reader in ORT's order (the
        chunked loss' chunks; not a recomputed layer's forward reader and its backward reader, between which
        the whole layer's backward runs)."""
        at = sorted(run_at[id(r)] for r in group)
        return bisect.bisect_right(read_at, at[-1]) - bisect.bisect_left(read_at, at[0]) == len(at)

    for weight, (chain, gate_on) in weights.items():
        readers = cons.get(weight, [])
        original_phase = id(chain[-1]) in backward
        kept = 0
        for phase in (False, True):  # the forward's readers, then the backward's
            group = [r for r in readers if (id(r) in backward) == phase]
            if not group:
                continue
            region = backward if phase else everything
            # One dequantization per phase when one tensor precedes every reader of the phase and they run one
            # after the other (the chunked loss' chunks); the copy then lives from the first reader to the last.
            together = one_after_the_other(group)
            if phase == original_phase and together and _first_of([gate_on], group, prod, region, memo):
                kept += len(group)
                shared += len(group) > 1
                continue
            gates = [gate_input(r, weight, prod, cons, backward) for r in group]
            first = _first_of(gates, group, prod, region, memo) if len(group) > 1 and together else None
            if first is not None:
                copy_for(group, weight, chain, gate_on, first)
                shared += 1
                continue
            for reader, after in zip(group, gates):  # each its own, made when the reader is about to run
                if phase == original_phase and gate_on in reader.input:
                    kept += 1  # the reader the dequantization was made for
                elif after is None:
                    report.skipped.append(f"{reader.name}: no input of its own to gate a copy of {weight} on")
                    kept += 1
                else:
                    copy_for([reader], weight, chain, gate_on, after)
        if not kept:  # no reader left on the original (its reader was replaced by a pass)
            dead.extend(chain)
    for at, nodes in sorted(inserts, key=lambda x: -x[0]):  # from the end, so indices stay valid
        for offset, node in enumerate(nodes):
            model.graph.node.insert(at + offset, node)
    for node in dead:
        model.graph.node.remove(node)
    report.details = {"copies": report.changed, "shared_by_several_readers": shared, "dropped_unread": len(dead)}
    return report


DEQUANTIZE_AT_USE = GraphPass("dequantize_at_use", "training", apply,
                              switch="quantize_weights")
