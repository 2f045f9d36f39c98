"""Store frozen weights pre-transposed: Transpose(W) of a frozen initializer becomes the initializer Wᵀ.

Why: the exporter writes nn.Linear as MatMul(x, Transpose(W)). ORT's training-graph optimiser folds those
transposes into new anonymous initializers in training_model.onnx but not in eval_model.onnx, so the two graphs
would hold differently named copies of every weight (and could not share one weights file). Folding them here,
before ORT sees the graph, is lossless and gives both graphs the same initializers. Adapters (trainable) are never
touched: their transposes must stay in the graph for the gradient.

A tied embedding table E [vocab, hidden] is also read by the input embedding's Gather; keeping E for it would store
the table twice (E and Eᵀ: 113 MB of float32 more for SmolLM2, 263 MB of INT8 for Llama-3.2-1B once quantized), and
the lookups touch E's pages all over the table. So the lookup reads the transposed copy by column:

    Gather(E, ids)  ->  Transpose(Gather(Eᵀ, ids, axis=1))        [hidden, *ids] -> [*ids, hidden]

the same values (a copy of each looked-up row), and E is dropped.
"""

from __future__ import annotations

import logging

import numpy as np

from ._base import (GraphPass, PassContext, PassReport, attr, consumers, initializer_map, initializer_nbytes,
                    initializer_value, make_initializer)

log = logging.getLogger(__name__)


def find(model, context: PassContext):
    """Transpose nodes whose only input is a frozen initializer (the adapters' transposes stay: ORT differentiates
    through them)."""
    inits = initializer_map(model)
    for node in model.graph.node:
        if node.op_type == "Transpose" and node.input and node.input[0] in inits \
                and node.input[0] not in context.trainable:
            yield node, inits[node.input[0]]


def check(node, weight, context: PassContext) -> str | None:
    """None if the rewrite may apply, else why not."""
    if weight.data_type != 1:  # float32 only; other types are rare here and not worth the risk
        return f"{weight.name} is not float32"
    return None


def replace(model, node, weight, context: PassContext) -> None:
    perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
    value = initializer_value(weight, context)
    transposed = np.ascontiguousarray(np.transpose(value, perm) if perm else value.T)
    model.graph.initializer.append(make_initializer(transposed, node.output[0], context))
    model.graph.node.remove(node)


def _rank(model, name: str) -> int | None:
    """The rank of a graph input or a tensor with recorded shape, None if unknown."""
    for info in [*model.graph.input, *model.graph.value_info]:
        if info.name == name and info.type.tensor_type.HasField("shape"):
            return len(info.type.tensor_type.shape.dim)
    return None


def read_tied_table_by_column(model, table: str, transposed: str) -> tuple[int, list[str]]:
    """Rewrite each row lookup Gather(table, ids) to read `transposed` (= tableᵀ) by column; (rewritten, skipped)."""
    from onnx import helper

    rewritten, skipped = 0, []
    for node in list(consumers(model).get(table, [])):
        if node.op_type == "Transpose":
            continue  # another transpose of the table: folded by this pass too
        rank = _rank(model, node.input[1]) if node.op_type == "Gather" else None
        if node.op_type != "Gather" or node.input[0] != table or attr(node, "axis", 0) != 0 or rank is None:
            skipped.append(f"{node.name}: reads tied table {table} as {node.op_type} (or ids of unknown rank); "
                           f"the table stays stored beside its transpose")
            continue
        columns = f"{node.output[0]}/columns"
        at = list(model.graph.node).index(node)
        model.graph.node.remove(node)
        model.graph.node.insert(at, helper.make_node("Gather", [transposed, node.input[1]], [columns],
                                                     name=f"{node.name}/Columns", axis=1))
        model.graph.node.insert(at + 1, helper.make_node("Transpose", [columns], [node.output[0]],
                                                         name=f"{node.name}/Rows", perm=[*range(1, rank + 1), 0]))
        rewritten += 1
    return rewritten, skipped


def apply(model, context: PassContext) -> PassReport:
    report = PassReport("pretranspose_frozen")
    tied = 0
    # tensors something other than a Transpose reads (taken once: the loop only removes transposes and rewrites the
    # lookups of the one table it is at), so only a weight with such a reader pays for a fresh look at its readers
    read_otherwise = {i for n in model.graph.node if n.op_type != "Transpose" for i in n.input}
    for node, weight in list(find(model, context)):
        why_not = check(node, weight, context)
        if why_not:
            log.info("pretranspose_frozen: leaving %s: %s", node.name, why_not)
            report.skipped.append(f"{node.name}: {why_not}")
            continue
        plain = len(weight.dims) == 2 and attr(node, "perm", [1, 0]) in ([1, 0], None)
        replace(model, node, weight, context)
        report.changed += 1
        report.bytes_freed += initializer_nbytes(weight)  # the Transpose's output, made every step
        report.freed_per = "step"
        if plain and weight.name in read_otherwise:  # a tied table: its lookups read the transposed copy
            rewritten, skipped = read_tied_table_by_column(model, weight.name, node.output[0])
            tied += rewritten
            report.skipped.extend(skipped)
    report.details["tied_lookups"] = tied
    # Drop weights nothing reads any more (their transposed copy replaced them, tied tables included).
    used = consumers(model)
    outputs = {o.name for o in model.graph.output}
    dropped = [i for i in model.graph.initializer if i.name not in used and i.name not in outputs
               and i.name not in context.trainable]
    for init in dropped:
        model.graph.initializer.remove(init)
    report.details["dropped_initializers"] = len(dropped)
    return report


PRETRANSPOSE_FROZEN = GraphPass("pretranspose_frozen", "forward", apply)
