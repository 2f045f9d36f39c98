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

A 2-D weight is transposed block by block (BLOCK bytes of Wᵀ's rows at a time, written to the pass's weights file as
they are made): a tied table is the largest tensor of a model (1.6 GB of float32 for Llama-3.2-3B's), and holding it
and its transpose whole cost twice that at the export's peak.

Written on onnx_ir (the first pass to be: see _ir.py).
"""

from __future__ import annotations

import logging

import numpy as np

from ._base import GraphPass, PassContext, PassReport
from ._ir import new_initializer, read_rows

log = logging.getLogger(__name__)

BLOCK = 256 << 20  # bytes of Wᵀ made at a time (W is read once per block, READ bytes at a time)
READ = 64 << 20


def find(graph, context: PassContext):
    """Transpose nodes whose only input is a frozen initializer (the adapters' transposes stay: ORT differentiates
    through them)."""
    for node in graph:
        weight = node.inputs[0] if node.op_type == "Transpose" and node.domain == "" and node.inputs else None
        if weight is not None and weight.is_initializer() and weight.name not in context.trainable:
            yield node, weight


def check(node, weight, context: PassContext) -> str | None:
    """None if the rewrite may apply, else why not."""
    import onnx_ir as ir

    if weight.const_value.dtype != ir.DataType.FLOAT:  # float32 only; other types are rare here, not worth the risk
        return f"{weight.name} is not float32"
    return None


def transposed_blocks(tensor, block_bytes: int = BLOCK, read_bytes: int = READ):
    """Wᵀ of a 2-D tensor W [m, n] in blocks of its rows: each block reads W in chunks of rows and keeps the block's
    columns, so memory holds one block and one chunk, never W or Wᵀ whole."""
    m, n = (int(d) for d in tensor.shape.numpy())
    itemsize = tensor.dtype.numpy().itemsize
    rows = max(1, block_bytes // max(1, m * itemsize))  # rows of Wᵀ (columns of W) per block
    chunk = max(1, read_bytes // max(1, n * itemsize))  # rows of W per read
    for a in range(0, n, rows):
        b = min(n, a + rows)
        block = np.empty((b - a, m), tensor.dtype.numpy())
        for r in range(0, m, chunk):
            block[:, r:r + chunk] = read_rows(tensor, r, min(m, r + chunk))[:, a:b].T
        yield block
        del block  # before the next block is made


def _perm(node) -> list[int] | None:
    perm = node.attributes.get_ints("perm", None)
    return None if perm is None else list(perm)


def replace(graph, node, weight, context: PassContext):
    """Replace the Transpose by an initializer holding its output (same name); that initializer's Value."""
    tensor = weight.const_value
    out = node.outputs[0]
    perm = _perm(node)
    if len(tensor.shape) == 2 and perm in (None, [1, 0]):
        m, n = (int(d) for d in tensor.shape.numpy())
        pieces, shape = transposed_blocks(tensor), (n, m)
    else:
        value = read_rows(tensor, 0, int(tensor.shape[0]))
        transposed = np.ascontiguousarray(np.transpose(value, perm) if perm else value.T)
        pieces, shape = [transposed], transposed.shape
    name = out.name
    out.name = None  # the initializer takes the name: the graph's readers and ORT's artifacts know it by it
    value = new_initializer(graph, name, pieces, tensor.dtype.numpy(), shape, context)
    out.replace_all_uses_with(value, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    return value


def read_tied_table_by_column(graph, table, transposed) -> tuple[int, list[str]]:
    """Rewrite each row lookup Gather(table, ids) to read `transposed` (= tableᵀ) by column; (rewritten, skipped)."""
    import onnx_ir as ir

    rewritten, skipped = 0, []
    for node in [use.node for use in table.uses()]:
        if node.op_type == "Transpose":
            continue  # another transpose of the table: folded by this pass too
        ids = node.inputs[1] if node.op_type == "Gather" and len(node.inputs) > 1 else None
        rank = len(ids.shape) if ids is not None and ids.shape is not None else None
        if node.op_type != "Gather" or node.inputs[0] is not table or node.attributes.get_int("axis", 0) != 0 \
                or rank is None:
            skipped.append(f"{node.name}: reads tied table {table.name} as {node.op_type} (or ids of unknown rank); "
                           f"the table stays stored beside its transpose")
            continue
        columns = ir.node("Gather", [transposed, ids], {"axis": 1}, name=f"{node.name}/Columns",
                          outputs=[ir.Value(name=f"{node.outputs[0].name}/columns")])
        rows = ir.node("Transpose", columns.outputs, {"perm": [*range(1, rank + 1), 0]}, name=f"{node.name}/Rows")
        ir.convenience.replace_nodes_and_values(graph, node, [node], [columns, rows], node.outputs, rows.outputs)
        rewritten += 1
    return rewritten, skipped


def apply(model, context: PassContext) -> PassReport:
    graph = model.graph
    report = PassReport("pretranspose_frozen")
    tied = 0
    # weights something other than a Transpose reads (taken once, before the loop removes transposes)
    read_otherwise = {v.name for v in graph.initializers.values()
                      if any(use.node.op_type != "Transpose" for use in v.uses())}
    for node, weight in list(find(graph, context)):
        why_not = check(node, weight, context)
        if why_not:
            log.info("pretranspose_frozen: leaving %s: %s", node.name, why_not)
            report.skipped.append(f"{node.name}: {why_not}")
            continue
        plain = len(weight.const_value.shape) == 2 and _perm(node) in (None, [1, 0])
        transposed = replace(graph, node, weight, context)
        report.changed += 1
        report.bytes_freed += weight.const_value.nbytes  # the Transpose's output, made every step
        report.freed_per = "step"
        if plain and weight.name in read_otherwise:  # a tied table: its lookups read the transposed copy
            rewritten, skipped = read_tied_table_by_column(graph, weight, transposed)
            tied += rewritten
            report.skipped.extend(skipped)
    report.details["tied_lookups"] = tied
    # Drop weights nothing reads any more (their transposed copy replaced them, tied tables included).
    dropped = [name for name, v in graph.initializers.items()
               if not v.uses() and not v.is_graph_output() and name not in context.trainable]
    for name in dropped:
        graph.initializers.pop(name)
    report.details["dropped_initializers"] = len(dropped)
    return report


PRETRANSPOSE_FROZEN = GraphPass("pretranspose_frozen", "forward", apply, ir=True)
