"""The stored form of quantized frozen weights, and where a graph dequantizes them.

quantize_frozen writes a matrix W as `<W>.int8` (+ `.scale`) or `<W>.int4` (+ `.scale`, `.min`, `.blocks`, `.shape`)
and dequantizes it in front of each reader, gated on the reader's activation. The passes that come after it
(chunked_loss, dequantize_in_slices, dequantize_at_use) and their tests find those dequantizations here.
"""

from __future__ import annotations

from ._base import ancestors, producers, saved_for_backward, view_chain

INT8, INT4 = ".int8", ".int4"  # suffixes of the stored initializers: `<weight>.int8`, `<weight>.int4.scale`, ...


def dequantized_weights(model) -> dict[str, tuple[list, str]]:
    """Every tensor that is a dequantized frozen matrix (made by quantize_frozen, or a copy of such a computation
    made by a later pass): name -> (the nodes computing it from the stored tensors, in stored order; the tensor its gate
    waits for)."""
    prod = producers(model)
    order = {id(n): i for i, n in enumerate(model.graph.node)}
    out = {}
    for node in model.graph.node:
        last = ((node.op_type == "DequantizeLinear" and node.input[0].endswith(INT8))
                or (node.op_type == "Reshape" and node.input[1].endswith(f"{INT4}.shape")))
        if not last:
            continue
        # Up to the gate's Size: what it measures is the activation the gate waits for, not part of the computation.
        chain = ancestors(node.output, prod, through=lambda up: up.op_type != "Size")
        gate_on = [up.input[0] for up in chain.values() if up.op_type == "Size"]
        if gate_on:
            out[node.output[0]] = (sorted(chain.values(), key=lambda n: order[id(n)]), gate_on[-1])
    return out


def kept_for_backward(model) -> set[str]:
    """Dequantized matrices the backward reads from the forward (each outlives the forward: what
    dequantize_at_use removes). A matrix counts through its views (INT4's last step is a Reshape)."""
    prod = producers(model)
    saved = saved_for_backward(model)
    return {t for t in dequantized_weights(model) if view_chain(t, prod)[-1] in saved}


def is_dequantized(value) -> bool:
    """Whether an onnx_ir value is a dequantized frozen matrix: dequantized_weights' test, on one value (the last
    node of a dequantization of stored `.int8` / `.int4` tensors, with a gate's Size above it)."""
    node = value.producer()
    if node is None or not ((node.op_type == "DequantizeLinear" and node.inputs[0].name.endswith(INT8))
                            or (node.op_type == "Reshape" and node.inputs[1].name.endswith(f"{INT4}.shape"))):
        return False
    seen, stack = set(), [node]
    while stack:
        up = stack.pop()
        if up.op_type == "Size":
            return True
        if up not in seen:
            seen.add(up)
            stack.extend(v.producer() for v in up.inputs if v is not None and v.producer() is not None)
    return False
