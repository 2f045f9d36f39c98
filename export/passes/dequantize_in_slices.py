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
"""

from __future__ import annotations

import logging
import math

import numpy as np

from lars_artifacts.memory_model import DEQUANTIZED_SLICE_BYTES, dequantized_slices

from ._base import GraphPass, PassContext, PassReport, attr, consumers, gate_all, initializer_map, shared_initializer
from ._dequantized import INT8, dequantized_weights

log = logging.getLogger(__name__)

MS = "com.microsoft"
SLICE_BYTES = DEQUANTIZED_SLICE_BYTES  # float32 bytes of one slice: the largest dequantized matrix this pass lets exist


def reader_kind(node, weight: str) -> str | None:
    """"matmul" for MatMul(x, W), "matmul_bt" for FusedMatMul(dz, W) with W transposed; None for any other reader."""
    if len(node.input) != 2 or node.input[1] != weight or node.input[0] == weight:
        return None
    if node.op_type == "MatMul" and (node.domain or "") == "":
        return "matmul"
    if node.op_type == "FusedMatMul" and node.domain == MS and (attr(node, "transA", 0), attr(node, "transB", 0),
                                                                attr(node, "alpha", 1.0)) == (0, 1, 1.0) \
            and not attr(node, "transBatchA", 0) and not attr(node, "transBatchB", 0):
        return "matmul_bt"
    return None


def find(model):
    """(dequantized tensor, its stored weight name, [K, N], slices, its computation's nodes) of every INT8
    per-column matrix whose float32 copy exceeds SLICE_BYTES."""
    inits = initializer_map(model)
    for name, (chain, _gate) in dequantized_weights(model).items():
        last = next(n for n in chain if name in n.output)
        if last.op_type != "DequantizeLinear" or attr(last, "axis", 1) != 1:
            continue  # INT4 blocks run along K: they are not sliced by column
        weight = last.input[0].removesuffix(INT8)
        stored = inits.get(last.input[0])
        if stored is None or len(stored.dims) != 2 or f"{weight}{INT8}.scale" not in inits:
            continue
        k, n = stored.dims
        slices = dequantized_slices(k, n, SLICE_BYTES)
        if slices > 1:
            yield name, weight, (k, n), slices, chain


def sliced(model, reader, kind: str, weight: str, n: int, slices: int) -> list:
    """The nodes replacing `reader` (a MatMul or FusedMatMul reading the dequantized weight): one gated slice at a
    time, writing the reader's own output."""
    from onnx import helper

    width = math.ceil(n / slices)
    axis1 = shared_initializer(model, "passes.slices.axis1", np.array([1], np.int64))
    axis0 = shared_initializer(model, "passes.slices.axis0", np.array([0], np.int64))
    last_axis = shared_initializer(model, "passes.slices.last_axis", np.array([-1], np.int64))
    prefix = f"{reader.name or reader.output[0]}/Slices"
    nodes, parts, after = [], [], reader.input[0]
    for j in range(slices):
        p = f"{prefix}/{j}"
        start = shared_initializer(model, f"{weight}/slice{j}.start", np.array([j * width], np.int64))
        end = shared_initializer(model, f"{weight}/slice{j}.end", np.array([min(n, (j + 1) * width)], np.int64))
        gate, (gated_start,) = gate_all(model, p, [start], after)
        nodes += gate + [
            helper.make_node("Slice", [f"{weight}{INT8}", gated_start, end, axis1], [f"{p}/q"], name=f"{p}/SliceQ"),
            helper.make_node("Slice", [f"{weight}{INT8}.scale", gated_start, end, axis0], [f"{p}/scale"],
                             name=f"{p}/SliceScale"),
            helper.make_node("DequantizeLinear", [f"{p}/q", f"{p}/scale"], [f"{p}/weight"],
                             name=f"{p}/DequantizeLinear", axis=1),
        ]
        part = f"{p}/part"
        if kind == "matmul":
            nodes.append(helper.make_node("MatMul", [reader.input[0], f"{p}/weight"], [part], name=f"{p}/MatMul"))
        else:
            nodes += [
                helper.make_node("Slice", [reader.input[0], start, end, last_axis], [f"{p}/dz"], name=f"{p}/SliceDz"),
                helper.make_node("FusedMatMul", [f"{p}/dz", f"{p}/weight"], [part], name=f"{p}/FusedMatMul",
                                 domain=MS, transA=0, transB=1, alpha=1.0),
            ]
            if parts:  # a running sum: each part dies once added
                total = reader.output[0] if j == slices - 1 else f"{p}/sum"
                nodes.append(helper.make_node("Add", [parts[-1], part], [total], name=f"{p}/Add"))
                part = total
        parts.append(part)
        after = part
    if kind == "matmul":
        nodes.append(helper.make_node("Concat", parts, [reader.output[0]], name=f"{prefix}/Concat", axis=-1))
    return nodes


def _drop_unused(model, chain: list) -> int:
    """Remove the nodes of `chain` whose outputs nothing reads any more (the whole dequantization once no reader
    is left); returns how many."""
    removed, outputs, cons = 0, {o.name for o in model.graph.output}, consumers(model)
    for node in reversed(chain):  # readers first: a node's inputs lose it as a reader once it goes
        if not any(cons.get(o) or o in outputs for o in node.output if o):
            model.graph.node.remove(node)
            for i in node.input:
                cons[i] = [c for c in cons.get(i, []) if c != node]  # by value: protobuf ids are unstable
            removed += 1
    return removed


def apply(model, context: PassContext) -> PassReport:
    report = PassReport("dequantize_in_slices")
    matrices = []
    for name, weight, (k, n), slices, chain in list(find(model)):
        readers = consumers(model).get(name, [])
        done = 0
        for reader in readers:
            kind = reader_kind(reader, name)
            if kind is None:
                report.skipped.append(f"{weight}: read whole by {reader.op_type} {reader.name}")
                continue
            at = list(model.graph.node).index(reader)
            new = sliced(model, reader, kind, weight, n, slices)
            model.graph.node.remove(reader)
            for offset, node in enumerate(new):
                model.graph.node.insert(at + offset, node)
            done += 1
        _drop_unused(model, chain)
        if done:
            matrices.append({"weight": weight, "shape": [k, n], "slices": slices, "readers": done})
            report.changed += 1
            # per reader, the float32 matrix at once: the whole of it before, one slice now
            report.bytes_freed = max(report.bytes_freed, 4 * k * n - 4 * k * math.ceil(n / slices))
            report.freed_per = "step"
            log.info("dequantize_in_slices: %s [%d, %d] in %d slices for %d readers", weight, k, n, slices, done)
    report.details = {"slice_bytes": SLICE_BYTES, "matrices": matrices}
    return report


DEQUANTIZE_IN_SLICES = GraphPass("dequantize_in_slices", "training", apply,
                                 switch="quantize_weights")
