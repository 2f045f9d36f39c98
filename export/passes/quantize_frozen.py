"""Quantized frozen weights: INT8 per-channel or INT4 block-wise storage, dequantized inside the graph at each use.

Once activations are cut, the frozen matrices are most of a step's resident memory (SmolLM2-135M: 538 MB of
float32, its tied embedding stored once). The pass stores each one quantized (formats: lars_export.quantization)
and puts a small dequantization in front of each reader:

    MatMul(x, Wᵀ)   ->  MatMul(x, Dequantize(Wq))        INT8: DequantizeLinear per output channel
                                                          INT4: unpack nibbles, ·scale + minimum per block
    Gather(E, ids)  ->  Cast(Gather(Eq, ids)) · Gather(scale, ids)   (rows are dequantized after the lookup)
    Gather(W, ids, axis=1)  ->  Cast(Gather(Wq, ids, axis=1)) · Gather(scale, ids)   (a tied table's lookups of
                                                          the output projection's columns; INT8 per column)

so a float32 copy of a matrix exists only while its reader runs. Two things would undo that, and the passes
guard against both:
- ORT constant-folds a computation on initializers into a new float32 initializer (generate_artifacts does it at
  export, the session at load: measured). The dequantization's inputs go through a gate on the reader's
  activation (passes._base.gate_all: an aliasing Unsqueeze whose axes wait for x), so they depend on the step's
  data and cannot be folded; nor can the dequantization run before x exists.
- ORT's backward reads the forward's dequantized tensor (the input gradient dx = dy·W), which would keep every
  float32 matrix alive from the forward to the backward. The training-stage pass dequantize_at_use gives each
  such reader its own gated copy.

In int4 mode the embedding table and the output projection stay INT8: the projection's dequantized [hidden,
vocab] copy exists at the loss, where the step peaks, and INT4's unpacking holds two float32 copies of it there
against one for DequantizeLinear (above 128 MB, dequantize_in_slices makes it one column slice at a time).
"""

from __future__ import annotations

import logging

import numpy as np

from lars_artifacts import LOGITS

from .. import quantization
from ._base import (GraphPass, PassContext, PassReport, attr, consumers, gate_all, initializer_map,
                    initializer_nbytes, initializer_value, make_initializer, producers, shared_initializer,
                    view_chain)
from ._dequantized import INT4, INT8

log = logging.getLogger(__name__)

MIN_ELEMENTS = 1024  # smaller matrices are not worth a dequantization (norm weights are vectors anyway)
_FOUR = "passes.quantize.four"  # uint8 4, the nibble shift (one shared initializer)


def find(model, context: PassContext):
    """Frozen float32 matrices and their readers: (initializer, [(node, input index)])."""
    cons = consumers(model)
    for name, init in initializer_map(model).items():
        if name in context.trainable or init.data_type != 1 or len(init.dims) != 2:
            continue
        readers = [(n, k) for n in cons.get(name, []) for k, i in enumerate(n.input) if i == name]
        if readers:
            yield init, readers


def check(init, readers) -> str | None:
    """None if the weight may be quantized, else why not."""
    size = int(np.prod(init.dims))
    if size < MIN_ELEMENTS:
        return f"{size} elements, below {MIN_ELEMENTS}"
    kinds = {reader_kind(n, k) or f"{n.op_type} {n.name}" for n, k in readers}
    known = {"MatMul", "Gather", "GatherColumns"}
    if kinds - known:
        return f"read by {sorted(kinds - known)[0]} (only MatMul weights and Gather tables)"
    if "Gather" in kinds and len(kinds) > 1:
        return "read both as a MatMul weight and as a Gather table"
    return None


def reader_kind(node, k: int) -> str | None:
    """How a reader uses the weight at its input k: "MatMul" (the weight [K, N]), "Gather" (rows of a table),
    "GatherColumns" (columns of a MatMul weight: a tied table's lookups, see pretranspose_frozen); None otherwise."""
    if node.op_type == "MatMul" and k == 1:
        return "MatMul"
    if node.op_type == "Gather" and k == 0:
        return {0: "Gather", 1: "GatherColumns"}.get(attr(node, "axis", 0))
    return None


def scheme_for(init, readers, scheme: str, block: int, lm_head: str | None) -> str:
    """The format a weight gets: int4 only for MatMul weights of whole blocks, other than the output projection
    (a weight also looked up by column is INT8: its columns are dequantized per lookup)."""
    if scheme == "int4" and (any(n.op_type != "MatMul" for n, _ in readers) or init.name == lm_head
                             or not quantization.int4_fits(tuple(init.dims), block)):
        return "int8"
    return scheme


def _lm_head_weight(model) -> str | None:
    """The weight of the MatMul that makes the logits output, if there is one."""
    prod = producers(model)
    if LOGITS not in {o.name for o in model.graph.output}:
        return None
    node = prod.get(view_chain(LOGITS, prod)[-1])
    return node.input[1] if node is not None and node.op_type == "MatMul" else None


def store(model, init, scheme: str, table: bool, context: PassContext) -> int:
    """Replace float32 initializer `init` by its quantized tensors; return their bytes. `table`: a Gather table
    (INT8 per row) rather than a MatMul weight [K, N] (per output column, or INT4 blocks along K)."""
    w = initializer_value(init, context)
    if scheme == "int8":
        q, scale = quantization.int8_per_channel(w, axis=0 if table else 1)
        tensors = {INT8: q, f"{INT8}.scale": scale.reshape(-1, 1) if table else scale}
    else:
        block = context.quantize_block
        packed, scale, minimum = quantization.int4_blockwise(w, block)
        tensors = {INT4: packed, f"{INT4}.scale": scale, f"{INT4}.min": minimum,
                   f"{INT4}.blocks": np.array([w.shape[0] // block, block, w.shape[1]], np.int64),
                   f"{INT4}.shape": np.array(w.shape, np.int64)}
    model.graph.initializer.remove(init)
    for suffix, value in tensors.items():
        model.graph.initializer.append(make_initializer(value, f"{init.name}{suffix}", context))
    return sum(v.nbytes for v in tensors.values())


def matmul_dequantize(model, weight: str, scheme: str, prefix: str, after: str) -> tuple[list, str]:
    """Nodes that dequantize stored `weight` for one MatMul reader, gated on `after`; and the output name."""
    from onnx import TensorProto, helper

    out = f"{prefix}/weight"
    if scheme == "int8":
        gate, (scale,) = gate_all(model, prefix, [f"{weight}{INT8}.scale"], after)
        return gate + [helper.make_node("DequantizeLinear", [f"{weight}{INT8}", scale], [out],
                                        name=f"{prefix}/DequantizeLinear", axis=1)], out
    gate, (packed, scale, minimum) = gate_all(
        model, prefix, [f"{weight}{INT4}", f"{weight}{INT4}.scale", f"{weight}{INT4}.min"], after)
    four = shared_initializer(model, _FOUR, np.asarray(np.uint8(4)))
    p = lambda s: f"{prefix}/{s}"  # noqa: E731
    return gate + [
        # low nibble: (b << 4) >> 4 in uint8 (BitwiseAnd needs opset 18); high nibble: b >> 4
        helper.make_node("BitShift", [packed, four], [p("shifted")], name=p("ShiftUp"), direction="LEFT"),
        helper.make_node("BitShift", [p("shifted"), four], [p("low")], name=p("LowNibbles"), direction="RIGHT"),
        helper.make_node("BitShift", [packed, four], [p("high")], name=p("HighNibbles"), direction="RIGHT"),
        helper.make_node("Concat", [p("low"), p("high")], [p("q")], name=p("Unpack"), axis=0),
        helper.make_node("Cast", [p("q")], [p("q_float")], name=p("ToFloat"), to=TensorProto.FLOAT),
        helper.make_node("Reshape", [p("q_float"), f"{weight}{INT4}.blocks"], [p("q_blocks")], name=p("Blocks")),
        helper.make_node("Cast", [scale], [p("scale")], name=p("ScaleToFloat"), to=TensorProto.FLOAT),
        helper.make_node("Cast", [minimum], [p("min")], name=p("MinToFloat"), to=TensorProto.FLOAT),
        helper.make_node("Mul", [p("q_blocks"), p("scale")], [p("scaled")], name=p("Scale")),
        helper.make_node("Add", [p("scaled"), p("min")], [p("w_blocks")], name=p("Shift")),
        helper.make_node("Reshape", [p("w_blocks"), f"{weight}{INT4}.shape"], [out], name=p("Weight")),
    ], out


def gather_dequantize(weight: str, ids: str, out: str, prefix: str) -> list:
    """Nodes for Gather(table, ids) -> out from an INT8 table: look up rows and their scales, then scale."""
    from onnx import TensorProto, helper

    p = lambda s: f"{prefix}/{s}"  # noqa: E731
    return [
        helper.make_node("Gather", [f"{weight}{INT8}", ids], [p("rows")], name=p("Rows"), axis=0),
        helper.make_node("Gather", [f"{weight}{INT8}.scale", ids], [p("row_scales")], name=p("RowScales"), axis=0),
        helper.make_node("Cast", [p("rows")], [p("rows_float")], name=p("ToFloat"), to=TensorProto.FLOAT),
        helper.make_node("Mul", [p("rows_float"), p("row_scales")], [out], name=p("Scale")),
    ]


def gather_columns_dequantize(weight: str, ids: str, out: str, prefix: str) -> list:
    """Nodes for Gather(W, ids, axis=1) -> out [K, *ids] from an INT8 per-column weight: the columns and their
    scales looked up, then scaled (the scales [*ids] broadcast over K)."""
    from onnx import TensorProto, helper

    p = lambda s: f"{prefix}/{s}"  # noqa: E731
    return [
        helper.make_node("Gather", [f"{weight}{INT8}", ids], [p("columns")], name=p("Columns"), axis=1),
        helper.make_node("Gather", [f"{weight}{INT8}.scale", ids], [p("column_scales")], name=p("ColumnScales"),
                         axis=0),
        helper.make_node("Cast", [p("columns")], [p("columns_float")], name=p("ToFloat"), to=TensorProto.FLOAT),
        helper.make_node("Mul", [p("columns_float"), p("column_scales")], [out], name=p("Scale")),
    ]


def apply(model, context: PassContext) -> PassReport:
    report = PassReport("quantize_frozen")
    if context.quantize == "none":
        return report
    lm_head = _lm_head_weight(model)
    counts = {"int8": 0, "int4": 0}
    before = after = 0
    for init, readers in list(find(model, context)):
        why_not = check(init, readers)
        if why_not:
            log.info("quantize_frozen: leaving %s: %s", init.name, why_not)
            report.skipped.append(f"{init.name}: {why_not}")
            continue
        scheme = scheme_for(init, readers, context.quantize, context.quantize_block, lm_head)
        table = all(reader_kind(n, k) == "Gather" for n, k in readers)
        before += initializer_nbytes(init)
        after += store(model, init, scheme, table, context)
        for node, k in readers:
            prefix = f"{node.name or init.name}/Dequantize"  # the reader's scope: layer_recompute groups by name
            if node.op_type == "Gather":
                make = gather_dequantize if table else gather_columns_dequantize
                new = make(init.name, node.input[1], node.output[0], prefix)
                at = list(model.graph.node).index(node)
                model.graph.node.remove(node)
            else:
                new, out = matmul_dequantize(model, init.name, scheme, prefix, node.input[0])
                node.input[k] = out
                at = list(model.graph.node).index(node)
            for offset, n in enumerate(new):
                model.graph.node.insert(at + offset, n)
        counts[scheme] += 1
        report.changed += 1
    report.bytes_freed, report.freed_per = before - after, "bundle"
    report.details = {"scheme": context.quantize, "block": context.quantize_block if context.quantize == "int4"
                      else None, "matrices": counts, "float32_bytes": before, "stored_bytes": after}
    return report


QUANTIZE_FROZEN = GraphPass("quantize_frozen", "forward", apply, switch="quantize_weights")
