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
  activation (passes._ir.gate_all: an aliasing Unsqueeze whose axes wait for x), so they depend on the step's
  data and cannot be folded; nor can the dequantization run before x exists.
- ORT's backward reads the forward's dequantized tensor (the input gradient dx = dy·W), which would keep every
  float32 matrix alive from the forward to the backward. The training-stage pass dequantize_at_use gives each
  such reader its own gated copy.

In int4 mode the embedding table and the output projection stay INT8: the projection's dequantized [hidden,
vocab] copy exists at the loss, where the step peaks, and INT4's unpacking holds two float32 copies of it there
against one for DequantizeLinear (above 128 MB, dequantize_in_slices makes it one column slice at a time).

Written on onnx_ir (passes/_ir.py).
"""

from __future__ import annotations

import logging

import numpy as np

from lars_artifacts import LOGITS

from .. import quantization
from ._base import VIEW_OPS, GraphPass, PassContext, PassReport
from ._dequantized import INT4, INT8
from ._ir import gate_all, new_initializer, read_rows, shared_initializer

log = logging.getLogger(__name__)

MIN_ELEMENTS = 1024  # smaller matrices are not worth a dequantization (norm weights are vectors anyway)
_FOUR = "passes.quantize.four"  # uint8 4, the nibble shift (one shared initializer)
CHUNK = 64 << 20  # bytes of a float32 weight read and quantized at a time


def find(graph, context: PassContext):
    """Frozen float32 matrices and their readers: (initializer Value, [(node, input index)] in graph order)."""
    import onnx_ir as ir

    position = {node: i for i, node in enumerate(graph)}
    for name, init in list(graph.initializers.items()):
        tensor = init.const_value
        if name in context.trainable or tensor.dtype != ir.DataType.FLOAT or len(tensor.shape) != 2:
            continue
        readers = sorted(((use.node, use.idx) for use in init.uses()), key=lambda r: (position[r[0]], r[1]))
        if readers:
            yield init, readers


def check(init, readers) -> str | None:
    """None if the weight may be quantized, else why not."""
    size = int(np.prod(init.const_value.shape.numpy()))
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
        return {0: "Gather", 1: "GatherColumns"}.get(node.attributes.get_int("axis", 0))
    return None


def scheme_for(init, readers, scheme: str, block: int, lm_head: str | None) -> str:
    """The format a weight gets: int4 only for MatMul weights of whole blocks, other than the output projection
    (a weight also looked up by column is INT8: its columns are dequantized per lookup)."""
    shape = tuple(init.const_value.shape.numpy())
    if scheme == "int4" and (any(n.op_type != "MatMul" for n, _ in readers) or init.name == lm_head
                             or not quantization.int4_fits(shape, block)):
        return "int8"
    return scheme


def _lm_head_weight(graph) -> str | None:
    """The weight of the MatMul that makes the logits output, if there is one."""
    logits = next((o for o in graph.outputs if o.name == LOGITS), None)
    node = logits.producer() if logits is not None else None
    while node is not None and node.op_type in VIEW_OPS:
        node = node.inputs[0].producer()
    return node.inputs[1].name if node is not None and node.op_type == "MatMul" else None


def store(graph, init, scheme: str, table: bool, context: PassContext) -> tuple[dict, int]:
    """Replace float32 initializer `init` by its quantized tensors: ({suffix: Value}, their bytes). `table`: a
    Gather table (INT8 per row) rather than a MatMul weight [K, N] (per output column, or INT4 blocks along K).
    The weight is read and quantized CHUNK bytes of rows at a time (quantization's *_chunks), its quantized values
    written as they are made."""
    tensor = init.const_value
    k, n = shape = tuple(int(d) for d in tensor.shape.numpy())
    rows = lambda a, b: read_rows(tensor, a, b)  # noqa: E731
    chunk = max(1, CHUNK // (n * 4))
    if scheme == "int8":
        scale, values = quantization.int8_per_channel_chunks(rows, shape, 0 if table else 1, chunk)
        tensors = {INT8: (values, np.int8, shape), f"{INT8}.scale": scale.reshape(-1, 1) if table else scale}
    else:
        block = context.quantize_block
        scale, minimum, packed = quantization.int4_blockwise_chunks(rows, shape, block, chunk)
        tensors = {INT4: (packed, np.uint8, (k // 2, n)), f"{INT4}.scale": scale, f"{INT4}.min": minimum,
                   f"{INT4}.blocks": np.array([k // block, block, n], np.int64),
                   f"{INT4}.shape": np.array(shape, np.int64)}
    graph.initializers.pop(init.name)
    values, nbytes = {}, 0
    for suffix, value in tensors.items():
        pieces, dtype, dims = value if isinstance(value, tuple) else ([value], value.dtype, value.shape)
        values[suffix] = new_initializer(graph, f"{init.name}{suffix}", pieces, dtype, dims, context)
        nbytes += int(np.prod(dims, dtype=np.int64)) * np.dtype(dtype).itemsize
    return values, nbytes


def _node(op: str, inputs: list, output: str, name: str, **attributes):
    import onnx_ir as ir

    return ir.node(op, inputs, attributes, name=name, outputs=[ir.Value(name=output)])


def matmul_dequantize(graph, stored: dict, scheme: str, prefix: str, after) -> list:
    """Nodes that dequantize a stored weight (store's Values) for one MatMul reader, gated on `after`; the last
    node's output is the float32 weight."""
    import onnx_ir as ir

    out = f"{prefix}/weight"
    if scheme == "int8":
        gate, (scale,) = gate_all(graph, prefix, [stored[f"{INT8}.scale"]], [after])
        return gate + [_node("DequantizeLinear", [stored[INT8], scale], out, f"{prefix}/DequantizeLinear", axis=1)]
    gate, (packed, scale, minimum) = gate_all(
        graph, prefix, [stored[INT4], stored[f"{INT4}.scale"], stored[f"{INT4}.min"]], [after])
    four = shared_initializer(graph, _FOUR, np.asarray(np.uint8(4)))
    p = lambda s: f"{prefix}/{s}"  # noqa: E731
    nodes = []

    def add(op, inputs, output, name, **attributes):
        nodes.append(_node(op, inputs, p(output) if output != out else out, p(name), **attributes))
        return nodes[-1].outputs[0]

    # low nibble: (b << 4) >> 4 in uint8 (BitwiseAnd needs opset 18); high nibble: b >> 4
    shifted = add("BitShift", [packed, four], "shifted", "ShiftUp", direction="LEFT")
    low = add("BitShift", [shifted, four], "low", "LowNibbles", direction="RIGHT")
    high = add("BitShift", [packed, four], "high", "HighNibbles", direction="RIGHT")
    q = add("Concat", [low, high], "q", "Unpack", axis=0)
    q_float = add("Cast", [q], "q_float", "ToFloat", to=ir.DataType.FLOAT)
    q_blocks = add("Reshape", [q_float, stored[f"{INT4}.blocks"]], "q_blocks", "Blocks")
    scale = add("Cast", [scale], "scale", "ScaleToFloat", to=ir.DataType.FLOAT)
    minimum = add("Cast", [minimum], "min", "MinToFloat", to=ir.DataType.FLOAT)
    scaled = add("Mul", [q_blocks, scale], "scaled", "Scale")
    w_blocks = add("Add", [scaled, minimum], "w_blocks", "Shift")
    add("Reshape", [w_blocks, stored[f"{INT4}.shape"]], out, "Weight")
    return gate + nodes


def gather_dequantize(stored: dict, ids, out: str, prefix: str, axis: int) -> list:
    """Nodes for Gather(table, ids, axis) -> out from an INT8 weight: look up its rows (axis 0: a table, scaled per
    row) or columns (axis 1: a tied table's lookups of the output projection [K, N], scaled per column; the scales
    [*ids] broadcast over K) and their scales, then scale."""
    import onnx_ir as ir

    what, scales = ("rows", "row_scales") if axis == 0 else ("columns", "column_scales")
    p = lambda s: f"{prefix}/{s}"  # noqa: E731
    looked_up = _node("Gather", [stored[INT8], ids], p(what), p(what.capitalize()), axis=axis)
    scale = _node("Gather", [stored[f"{INT8}.scale"], ids], p(scales), p(scales.title().replace("_", "")), axis=0)
    to_float = _node("Cast", [looked_up.outputs[0]], p(f"{what}_float"), p("ToFloat"), to=ir.DataType.FLOAT)
    return [looked_up, scale, to_float, _node("Mul", [to_float.outputs[0], scale.outputs[0]], out, p("Scale"))]


def apply(model, context: PassContext) -> PassReport:
    import onnx_ir as ir

    graph = model.graph
    report = PassReport("quantize_frozen")
    if context.quantize == "none":
        return report
    lm_head = _lm_head_weight(graph)
    counts = {"int8": 0, "int4": 0}
    before = after = 0
    for init, readers in list(find(graph, context)):
        why_not = check(init, readers)
        if why_not:
            log.info("quantize_frozen: leaving %s: %s", init.name, why_not)
            report.skipped.append(f"{init.name}: {why_not}")
            continue
        scheme = scheme_for(init, readers, context.quantize, context.quantize_block, lm_head)
        table = all(reader_kind(n, k) == "Gather" for n, k in readers)
        before += init.const_value.nbytes
        stored, nbytes = store(graph, init, scheme, table, context)
        after += nbytes
        for node, k in readers:
            prefix = f"{node.name or init.name}/Dequantize"  # the reader's scope: layer_recompute groups by name
            if node.op_type == "Gather":
                new = gather_dequantize(stored, node.inputs[1], node.outputs[0].name, prefix,
                                        axis=0 if table else 1)
                ir.convenience.replace_nodes_and_values(graph, node, [node], new, node.outputs, new[-1].outputs)
            else:
                new = matmul_dequantize(graph, stored, scheme, prefix, node.inputs[0])
                graph.insert_before(node, new)
                node.replace_input_with(k, new[-1].outputs[0])
        counts[scheme] += 1
        report.changed += 1
    report.bytes_freed, report.freed_per = before - after, "bundle"
    report.details = {"scheme": context.quantize, "block": context.quantize_block if context.quantize == "int4"
                      else None, "matrices": counts, "float32_bytes": before, "stored_bytes": after}
    return report


QUANTIZE_FROZEN = GraphPass("quantize_frozen", "forward", apply, switch="quantize_weights", ir=True)
