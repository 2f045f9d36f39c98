"""Dequantize in slices: a large quantized matrix is never whole in float32; each reader gets it slice by slice.

quantize_frozen stores a matrix W [K, N] as INT8 per output column and dequantizes all of it for each reader. For
the output projection of a large vocabulary that float32 copy is the step's largest tensor (Llama-3.2-1B: 2048 x
128,256, 1.05 GB, against 263 MB stored), and it exists at the loss, where the step peaks. This pass rewrites each
reader so that one column slice of W at a time exists in float32:

    MatMul(x, W)                  ->  Concat_j MatMul(x, W[:, j])                 (logits: a slice of vocabulary each)
    FusedMatMul(dz, W, transB=1)  ->  Σ_j FusedMatMul(dz[:, j], W[:, j], transB=1)   (dh = dz·Wᵀ, summed in order)

W[:, j] = DequantizeLinear(Slice(Wq), Slice(scale)) with the Slice starts gated on the previous slice's product
(the first on the reader's own input), so ORT makes slice j + 1 only after slice j was used, and cannot fold a
slice into a float32 initializer. A slice holds at most SLICE_BYTES of float32 (the memory model's
DEQUANTIZED_SLICE_BYTES, which predicts the pieces). Readers of another form keep the
whole dequantization (reported). Runs after the passes that add readers (chunked_loss, layer_recompute) and before
dequantize_at_use, which then finds no whole copy left for these readers.

Logits are unchanged; dh changes by float summation order only (a sum over slices).

Written on onnx_ir (passes/_ir.py).
"""

from __future__ import annotations

import logging
import math

import numpy as np

from lars_artifacts.memory_model import DEQUANTIZED_SLICE_BYTES, dequantized_slices

from ._base import GraphPass, PassContext, PassReport
from ._dequantized import INT8, dequantized_weights
from ._ir import Nodes, gate_all, shared_initializer

log = logging.getLogger(__name__)

MS = "com.microsoft"
SLICE_BYTES = DEQUANTIZED_SLICE_BYTES  # float32 bytes of one slice: the largest dequantized matrix this pass lets exist


def reader_kind(node, weight) -> str | None:
    """"matmul" for MatMul(x, W), "matmul_bt" for FusedMatMul(dz, W) with W transposed; None for any other reader."""
    if len(node.inputs) != 2 or node.inputs[1] is not weight or node.inputs[0] is weight:
        return None
    if node.op_type == "MatMul" and node.domain == "":
        return "matmul"
    a = node.attributes
    if node.op_type == "FusedMatMul" and node.domain == MS and (a.get_int("transA", 0), a.get_int("transB", 0),
                                                                a.get_float("alpha", 1.0)) == (0, 1, 1.0) \
            and not a.get_int("transBatchA", 0) and not a.get_int("transBatchB", 0):
        return "matmul_bt"
    return None


def find(graph):
    """(dequantized value, its stored weight name, [K, N], slices, its computation's nodes) of every INT8
    per-column matrix whose float32 copy exceeds SLICE_BYTES."""
    for value, (chain, _gate) in dequantized_weights(graph).items():
        last = value.producer()
        if last.op_type != "DequantizeLinear" or last.attributes.get_int("axis", 1) != 1:
            continue  # INT4 blocks run along K: they are not sliced by column
        weight = last.inputs[0].name.removesuffix(INT8)
        stored = graph.initializers.get(last.inputs[0].name)
        if stored is None or len(stored.shape) != 2 or f"{weight}{INT8}.scale" not in graph.initializers:
            continue
        k, n = stored.shape.numpy()
        slices = dequantized_slices(k, n, SLICE_BYTES)
        if slices > 1:
            yield value, weight, (k, n), slices, chain


def sliced(graph, reader, kind: str, weight: str, n: int, slices: int) -> list:
    """The nodes replacing `reader` (a MatMul or FusedMatMul reading the dequantized weight): one gated slice at a
    time, the last writing a value named as the reader's output."""
    width = math.ceil(n / slices)
    axis1 = shared_initializer(graph, "passes.slices.axis1", np.array([1], np.int64))
    axis0 = shared_initializer(graph, "passes.slices.axis0", np.array([0], np.int64))
    last_axis = shared_initializer(graph, "passes.slices.last_axis", np.array([-1], np.int64))
    q, scale = graph.initializers[f"{weight}{INT8}"], graph.initializers[f"{weight}{INT8}.scale"]
    x, out = reader.inputs[0], reader.outputs[0].name
    prefix = f"{reader.name or out}/Slices"
    node = Nodes()
    nodes, parts, after = [], [], x
    for j in range(slices):
        p = f"{prefix}/{j}"
        start = shared_initializer(graph, f"{weight}/slice{j}.start", np.array([j * width], np.int64))
        end = shared_initializer(graph, f"{weight}/slice{j}.end", np.array([min(n, (j + 1) * width)], np.int64))
        gate, (gated_start,) = gate_all(graph, p, [start], [after])
        nodes += gate + [
            node("Slice", [q, gated_start, end, axis1], [f"{p}/q"], f"{p}/SliceQ"),
            node("Slice", [scale, gated_start, end, axis0], [f"{p}/scale"], f"{p}/SliceScale"),
            node("DequantizeLinear", [f"{p}/q", f"{p}/scale"], [f"{p}/weight"], f"{p}/DequantizeLinear", axis=1),
        ]
        part = f"{p}/part"
        if kind == "matmul":
            nodes.append(node("MatMul", [x, f"{p}/weight"], [part], f"{p}/MatMul"))
        else:
            nodes += [
                node("Slice", [x, start, end, last_axis], [f"{p}/dz"], f"{p}/SliceDz"),
                node("FusedMatMul", [f"{p}/dz", f"{p}/weight"], [part], f"{p}/FusedMatMul", domain=MS, transA=0,
                     transB=1, alpha=1.0),
            ]
            if parts:  # a running sum: each part dies once added
                total = out if j == slices - 1 else f"{p}/sum"
                nodes.append(node("Add", [parts[-1], part], [total], f"{p}/Add"))
                part = total
        parts.append(part)
        after = node.values[part]
    if kind == "matmul":
        nodes.append(node("Concat", parts, [out], f"{prefix}/Concat", axis=-1))
    return nodes


def _drop_unused(graph, chain: list) -> int:
    """Remove the nodes of `chain` whose outputs nothing reads any more (the whole dequantization once no reader
    is left); returns how many."""
    removed = 0
    for node in reversed(chain):  # readers first: a removed node stops reading its inputs
        if not any(v.uses() or v.is_graph_output() for v in node.outputs):
            graph.remove(node, safe=True)
            removed += 1
    return removed


def apply(model, context: PassContext) -> PassReport:
    import onnx_ir as ir

    graph = model.graph
    report = PassReport("dequantize_in_slices")
    matrices = []
    for value, weight, (k, n), slices, chain in list(find(graph)):
        position = {node: i for i, node in enumerate(graph)}
        readers = sorted({u.node for u in value.uses()}, key=position.__getitem__)
        done = 0
        for reader in readers:
            kind = reader_kind(reader, value)
            if kind is None:
                report.skipped.append(f"{weight}: read whole by {reader.op_type} {reader.name}")
                continue
            new = sliced(graph, reader, kind, weight, n, slices)
            graph.insert_before(reader, new)
            ir.convenience.replace_all_uses_with(reader.outputs[0], new[-1].outputs[0], replace_graph_outputs=True)
            graph.remove(reader, safe=True)
            done += 1
        _drop_unused(graph, chain)
        if done:
            matrices.append({"weight": weight, "shape": [k, n], "slices": slices, "readers": done})
            report.changed += 1
            # per reader, the float32 matrix at once: the whole of it before, one slice now
            report.bytes_freed = max(report.bytes_freed, 4 * k * n - 4 * k * math.ceil(n / slices))
            report.freed_per = "step"
            log.info("dequantize_in_slices: %s [%d, %d] in %d slices for %d readers", weight, k, n, slices, done)
    report.details = {"slice_bytes": SLICE_BYTES, "matrices": matrices}
    return report


DEQUANTIZE_IN_SLICES = GraphPass("dequantize_in_slices", "training", apply, switch="quantize_weights", ir=True)
