"""The stored form of quantized frozen weights, and where a graph dequantizes them.

quantize_frozen writes a matrix W as `<W>.int8` (+ `.scale`) or `<W>.int4` (+ `.scale`, `.min`, `.blocks`, `.shape`)
and dequantizes it in front of each reader, gated on the reader's activation. The passes that come after it
(chunked_loss, dequantize_in_slices, dequantize_at_use) and their tests find those dequantizations here. On onnx_ir
graphs; a ModelProto (a test's, a bundle's file) is converted first (_ir.ir_graph).
"""

from __future__ import annotations

from ._ir import ancestors, backward_nodes, ir_graph, saved_for_backward, view_chain

INT8, INT4 = ".int8", ".int4"  # suffixes of the stored initializers: `<weight>.int8`, `<weight>.int4.scale`, ...


def _last_step(node) -> bool:
    """Whether `node` makes a dequantized matrix from stored tensors: INT8's DequantizeLinear, INT4's final Reshape."""
    return ((node.op_type == "DequantizeLinear" and node.inputs[0].name.endswith(INT8))
            or (node.op_type == "Reshape" and node.inputs[1] is not None
                and node.inputs[1].name.endswith(f"{INT4}.shape")))


def dequantized_weights(model) -> dict:
    """Every value that is a dequantized frozen matrix (made by quantize_frozen, or a copy of such a computation made
    by a later pass): value -> (the nodes computing it from the stored tensors, in stored order; the value its gate
    waits for)."""
    graph = ir_graph(model)
    order = {node: i for i, node in enumerate(graph)}
    out = {}
    for node in graph:
        if not _last_step(node):
            continue
        # Up to the gate's Size: what it measures is the activation the gate waits for, not part of the computation.
        chain = ancestors(node.outputs, through=lambda up: up.op_type != "Size")
        gate_on = [up.inputs[0] for up in chain if up.op_type == "Size"]
        if gate_on:
            out[node.outputs[0]] = (sorted(chain, key=order.__getitem__), gate_on[-1])
    return out


def is_dequantized(value) -> bool:
    """Whether an onnx_ir value is a dequantized frozen matrix: dequantized_weights' test, on one value."""
    node = value.producer()
    if node is None or not _last_step(node):
        return False
    return any(up.op_type == "Size" for up in ancestors(node.outputs, through=lambda up: up.op_type != "Size"))


def kept_for_backward(model) -> set[str]:
    """Names of the dequantized matrices the backward reads from the forward (each outlives the forward: what
    dequantize_at_use removes). A matrix counts through its views (INT4's last step is a Reshape)."""
    graph = ir_graph(model)
    saved = saved_for_backward(graph, backward_nodes(graph))
    return {value.name for value in dequantized_weights(graph) if view_chain(value)[-1] in saved}
