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
(passes._ir.run_order): no other dequantized matrix is read in between. A recomputed layer's forward reader and
its backward reader are both in the backward, but the layer's whole backward runs between them: sharing one copy
there kept all seven of a layer's matrices alive through its backward (232 MB on Llama-3.2-1B), so each gets its
own. Run last: it must see the readers every other pass adds.

It changes no value: each copy computes the same float32 matrix from the same stored tensors.

Written on onnx_ir (passes/_ir.py).
"""

from __future__ import annotations

import bisect
import logging

from ._base import VIEW_OPS, GraphPass, PassContext, PassReport
from ._dequantized import dequantized_weights
from ._ir import backward_nodes, clone_node, insert_groups, ir_graph, redirect, run_order

log = logging.getLogger(__name__)


def readers_of(value, position: dict) -> list:
    """The nodes reading `value`, in stored order, once per input that reads it."""
    return sorted((u.node for u in value.uses()), key=position.__getitem__)


def gate_input(reader, weight, position: dict, backward: set):
    """A value the reader waits for besides the weight (a gradient for a backward reader), looking one node further
    when the reader reads only the weight (e.g. a Transpose of it)."""
    for node in [reader, *readers_of(reader.outputs[0], position)]:
        inputs = [v for v in node.inputs if v is not None and v.name and v is not weight
                  and v not in reader.outputs and v.producer() in position]  # made by the graph as it was
        preferred = [v for v in inputs if v.producer() in backward] if reader in backward else []
        if preferred or inputs:
            return (preferred or inputs)[0]
    return None


def _upstream(value, region: set, memo: dict) -> frozenset:
    """Values `value` depends on through nodes of `region`, itself included."""
    if value in memo:
        return memo[value]
    out, stack = {value}, [value]
    while stack:
        node = stack.pop().producer()
        if node is None or node not in region:
            continue
        for v in node.inputs:
            if v is not None and v not in out:
                if v in memo:
                    out |= memo[v]
                else:
                    out.add(v)
                    stack.append(v)
    memo[value] = frozenset(out)
    return memo[value]


def _first_of(gates: list, readers: list, region: set, memo: dict):
    """A gate value every reader depends on (so a copy made when it exists serves them all), or None."""
    needs = [frozenset().union(*(_upstream(v, region, memo) for v in r.inputs if v is not None)) for r in readers]
    return next((g for g in gates if g is not None and all(g in n for n in needs)), None)


def most_alive(model) -> int:
    """The largest number of dequantized matrices alive at once when ORT runs the graph (in run_order): a matrix
    lives from the last node of its computation to its last reader, looking through views and transposes of it."""
    graph = ir_graph(model)
    at = {node: k for k, node in enumerate(run_order(graph))}
    events = []
    for value, (chain, _gate) in dequantized_weights(graph).items():
        readers, stack = [], [value]
        while stack:
            current = stack.pop()
            for use in current.uses():
                node = use.node
                if node.op_type in (*VIEW_OPS, "Transpose") and node.inputs[0] is current:
                    stack.append(node.outputs[0])
                else:
                    readers.append(node)
        if readers:
            events += [(max(at[n] for n in chain), 1), (max(at[r] for r in readers), -1)]
    alive = peak = 0
    for _, change in sorted(events):  # at one position a free (-1) sorts before a make
        alive += change
        peak = max(peak, alive)
    return peak


def apply(model, context: PassContext) -> PassReport:
    graph = model.graph
    report = PassReport("dequantize_at_use")
    weights = dequantized_weights(graph)
    if not weights:
        return report
    position = {node: i for i, node in enumerate(graph)}
    run_at = {node: k for k, node in enumerate(run_order(graph))}
    readers = {weight: readers_of(weight, position) for weight in weights}
    read_at = sorted(run_at[r] for group in readers.values() for r in group)
    backward = set(backward_nodes(graph))
    everything = set(graph)
    memo: dict = {}
    inserts, dead, shared = [], [], 0

    def copy_for(group: list, weight, chain: list, gate_on, after) -> None:
        suffix = f".use{report.changed}"  # unique per copy: ORT's CSE may have merged gates, so chains share nodes
        renamed = {gate_on: after}
        copies = [clone_node(node, renamed, suffix, f"{node.name}{suffix}") for node in chain]
        redirect(group, renamed, {weight})
        inserts.append((min(position[r] for r in group), copies))
        report.changed += 1

    def one_after_the_other(group: list) -> bool:
        """No other dequantized matrix is read between the group's first and last reader in ORT's order (the
        chunked loss' chunks; not a recomputed layer's forward reader and its backward reader, between which
        the whole layer's backward runs)."""
        at = sorted(run_at[r] for r in group)
        return bisect.bisect_right(read_at, at[-1]) - bisect.bisect_left(read_at, at[0]) == len(at)

    for weight, (chain, gate_on) in weights.items():
        original_phase = chain[-1] in backward
        kept = 0
        for phase in (False, True):  # the forward's readers, then the backward's
            group = [r for r in readers[weight] if (r in backward) == phase]
            if not group:
                continue
            region = backward if phase else everything
            # One dequantization per phase when one tensor precedes every reader of the phase and they run one
            # after the other (the chunked loss' chunks); the copy then lives from the first reader to the last.
            together = one_after_the_other(group)
            if phase == original_phase and together and _first_of([gate_on], group, region, memo):
                kept += len(group)
                shared += len(group) > 1
                continue
            gates = [gate_input(r, weight, position, backward) for r in group]
            first = _first_of(gates, group, region, memo) if len(group) > 1 and together else None
            if first is not None:
                copy_for(group, weight, chain, gate_on, first)
                shared += 1
                continue
            for reader, after in zip(group, gates):  # each its own, made when the reader is about to run
                if phase == original_phase and gate_on in reader.inputs:
                    kept += 1  # the reader the dequantization was made for
                elif after is None:
                    report.skipped.append(f"{reader.name}: no input of its own to gate a copy of {weight.name} on")
                    kept += 1
                else:
                    copy_for([reader], weight, chain, gate_on, after)
        if not kept:  # no reader left on the original (its reader was replaced by a pass)
            dead.extend(chain)
    insert_groups(graph, inserts)
    graph.remove(dead, safe=True)  # checks that nothing left reads what they made
    report.details = {"copies": report.changed, "shared_by_several_readers": shared, "dropped_unread": len(dead)}
    return report


DEQUANTIZE_AT_USE = GraphPass("dequantize_at_use", "training", apply, switch="quantize_weights", ir=True)
