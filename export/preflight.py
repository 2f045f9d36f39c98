"""Preflight: find every op on a differentiable path that ORT 1.19.2 cannot differentiate, before ORT fails.

ORT builds the backward only for nodes between a trainable parameter and the loss, through float tensors. For
each such node whose op type has no gradient builder we report the op and the module it comes from (the
TorchScript exporter names nodes after the module path, e.g. /model/base_model/model/model/layers.0/mlp/CumSum).
"""

from __future__ import annotations

from collections import defaultdict

from lars_artifacts import LarsError

# Op types with a gradient builder in onnxruntime-training 1.19.2 (orttraining/core/graph/
# gradient_builder_registry.cc, rel-1.19). Ops absent here (ReduceMax, CumSum, Einsum, com.microsoft
# RotaryEmbedding, ...) fail deep inside artifact generation.
ORT_1_19_GRADIENT_OPS = frozenset("""
Cast Sin Cos Log Tanh Sqrt Erf MatMul FusedMatMul Split Relu Pow ReduceMean ReduceSum ReduceLogSumExp ReduceL2
Add Sub Mul Div Neg Concat ConcatTraining Reshape Transpose Gemm MaxPool Gather Conv ConvTranspose Squeeze Unsqueeze
Sigmoid Softmax LogSoftmax SoftmaxCrossEntropy SparseSoftmaxCrossEntropy SoftmaxCrossEntropyLoss
SoftmaxCrossEntropyLossInternal GlobalAveragePool AveragePool Dropout GatherND GatherElements Gelu BiasGelu FastGelu
QuickGelu LayerNormalization SimplifiedLayerNormalization BatchNormInternal MegatronF MegatronG Slice Where Send Recv
Expand Exp Flatten TopK Clip Abs Min Max Tile ATen Pad Identity PythonOp ScatterND ScatterElements Trilu FakeQuant
LSTMTraining GRUTraining Reciprocal LeakyRelu Resize PadAndUnflatten FlattenAndUnpad
""".split())

_FLOAT_TYPES = {1, 10, 11, 16}  # float, float16, double, bfloat16 (onnx.TensorProto)


def module_of(node_name: str) -> str:
    """'/model/base_model/model/model/layers.0/mlp/CumSum' -> 'model.layers.0.mlp'."""
    parts = [p for p in node_name.split("/") if p][:-1]
    # Strip our wrapper and PEFT's nesting so the name reads like the HF module path.
    for prefix in (["model", "base_model", "model"], ["model"]):
        if parts[:len(prefix)] == prefix:
            parts = parts[len(prefix):]
            break
    return ".".join(parts) or "<top level>"


def weightless(model_proto, size_threshold: int = 1024):
    """A copy of model_proto whose initializers above size_threshold bytes are typed graph inputs instead (small ones,
    e.g. Reshape's shapes, stay). Shape inference needs no weight values, and with them it copies the model several
    times over (+1.7 GB peak for SmolLM2-135M's 0.5 GB)."""
    import onnx
    from onnx import helper

    light = onnx.ModelProto(ir_version=model_proto.ir_version, producer_name=model_proto.producer_name)
    light.opset_import.extend(model_proto.opset_import)
    light.functions.extend(model_proto.functions)
    graph = light.graph
    graph.name = model_proto.graph.name
    graph.node.extend(model_proto.graph.node)
    graph.input.extend(model_proto.graph.input)
    graph.output.extend(model_proto.graph.output)
    for init in model_proto.graph.initializer:
        if init.ByteSize() > size_threshold:
            graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        else:
            graph.initializer.append(init)
    return light


def differentiable_nodes(model_proto, trainable: set[str], loss_output: str):
    """Nodes on a float path from a trainable initializer to `loss_output`."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(weightless(model_proto), strict_mode=False)
    elem_type = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        elem_type[vi.name] = vi.type.tensor_type.elem_type
    for init in model_proto.graph.initializer:
        elem_type[init.name] = init.data_type

    def is_float(name: str) -> bool:
        return elem_type.get(name, 1) in _FLOAT_TYPES  # unknown: assume float (the conservative side)

    nodes = list(model_proto.graph.node)
    forward = set(trainable)
    for node in nodes:  # graph nodes are topologically sorted
        if any(i in forward for i in node.input):
            forward.update(o for o in node.output if is_float(o))
    backward = {loss_output}
    for node in reversed(nodes):
        if any(o in backward for o in node.output):
            backward.update(i for i in node.input if is_float(i))
    return [n for n in nodes
            if any(i in forward and i in backward for i in n.input)
            and any(o in forward and o in backward for o in n.output)]


def check_gradient_ops(model_proto, trainable: set[str], loss_output: str,
                       supported: frozenset[str] = ORT_1_19_GRADIENT_OPS) -> int:
    """Raise a LarsError listing every unsupported op and its modules; return the number of nodes checked."""
    nodes = differentiable_nodes(model_proto, trainable, loss_output)
    missing: dict[str, list[str]] = defaultdict(list)
    for node in nodes:
        if node.op_type not in supported:
            op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
            module = module_of(node.name)
            if module not in missing[op]:
                missing[op].append(module)
    if missing:
        parts = []
        for op, modules in missing.items():
            shown = ", ".join(modules[:3]) + (f" and {len(modules) - 3} more" if len(modules) > 3 else "")
            parts.append(f"{op} (in {shown})")
        raise LarsError("onnxruntime-training 1.19.2 has no gradient for " + "; ".join(parts)
                        + ": export these modules in a form without those ops (eager attention, no fused kernels) "
                          "or leave them out of --targets")
    return len(nodes)
