"""What every lowering rule shares: the Rule itself, the Lowering context it reads the graph through, and the
Builder it writes its replacement nodes with.

A rule is three things, in the shape of onnxscript's rewriter: which node it lowers (op type + domain), `check`
(why this node cannot be lowered, or None) and `replace` (the standard-ONNX nodes that compute the node's outputs,
under the node's own output names). Checks run on every node before the graph is touched, so a node that cannot be
lowered raises before anything changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from lars_artifacts import LarsError

MS = "com.microsoft"
MIN_OPSET = 13  # Split/Squeeze/Unsqueeze/ReduceSum take their sizes and axes as inputs from 13 on


FOLDABLE = {"Identity", "Cast", "Concat", "Reshape", "Unsqueeze", "Squeeze"}  # what `constant` looks through


@dataclass
class Rule:
    op_type: str
    domain: str  # "" (ONNX) or "com.microsoft"
    check: Callable  # (node, Lowering) -> str | None: why this node cannot be lowered
    replace: Callable  # (node, Builder) -> None: append the replacement nodes to the builder
    strict_only: bool = False  # an op plain onnxruntime runs: lowered only with strict=True

    def matches(self, node, strict: bool) -> bool:
        return (node.op_type == self.op_type and (node.domain or "") == self.domain
                and (strict or not self.strict_only))


def attr(node, name: str, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            value = helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


def requires_inputs(*names: str) -> Callable:
    """A rule's `check` for an op that only needs its first len(names) inputs present: "it lacks dY or Y"."""
    def check(node, ctx) -> str | None:
        if len(node.input) < len(names) or not all(node.input[:len(names)]):
            return f"it lacks {', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else f"it lacks {names[0]}"
        return None

    return check


def has_input(node, index: int) -> bool:
    return len(node.input) > index and node.input[index] != ""


def _unique(hint: str, taken: set) -> str:
    """`hint`, or `hint_k` with the smallest k not in `taken`; recorded as taken."""
    name, k = hint, 1
    while name in taken:
        name, k = f"{hint}_{k}", k + 1
    taken.add(name)
    return name


class Lowering:
    """The graph as the rules see it: names in use, producers and consumers, element types and ranks (inferred on
    demand), constant values of small tensors, and the constants the rules add (shared initializers)."""

    def __init__(self, model) -> None:
        self.model = model
        graph = model.graph
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        if self.opset < MIN_OPSET:
            raise LarsError(f"cannot lower a graph of ONNX opset {self.opset}: the lowering needs opset "
                            f"{MIN_OPSET} or later (export with --opset 17)")
        self.initializers = {i.name: i for i in graph.initializer}
        self.taken: set[str] = set(self.initializers)
        self.taken.update(v.name for v in (*graph.input, *graph.output, *graph.value_info))
        self.node_names: set[str] = set()
        self.producer: dict = {}
        self.consumers: dict[str, list] = {}
        for node in graph.node:
            self.node_names.add(node.name)
            for o in node.output:
                if o:
                    self.producer[o] = node
                    self.taken.add(o)
            for i in node.input:
                self.consumers.setdefault(i, []).append(node)
        self.refresh_outputs()
        self._constants: dict[tuple, str] = {}
        self.types = Types(model, self.producer)

    # -- the graph ------------------------------------------------------------------------------------------------
    def refresh_outputs(self) -> None:
        self.graph_outputs = {o.name for o in self.model.graph.output}

    def is_used(self, name: str) -> bool:
        """Whether any node reads `name` or the graph outputs it."""
        return bool(name) and (name in self.graph_outputs or bool(self.consumers.get(name)))

    def fail(self, node, why: str):
        raise LarsError(f"cannot lower node {node.name or node.output[0]!r} ({node.domain or 'ai.onnx'}:"
                        f"{node.op_type}): {why}")

    def fresh(self, hint: str) -> str:
        """A tensor name not used anywhere in the graph yet."""
        return _unique(hint, self.taken)

    def fresh_node(self, hint: str) -> str:
        """A node name not used in the graph yet."""
        return _unique(hint, self.node_names)

    # -- types ----------------------------------------------------------------------------------------------------
    def elem_type(self, name: str) -> int | None:
        t = self.types.get(name)
        return t.tensor_type.elem_type if t is not None and t.tensor_type.elem_type else None

    def rank(self, name: str) -> int | None:
        t = self.types.get(name)
        if t is None or not t.tensor_type.HasField("shape"):
            return None
        return len(t.tensor_type.shape.dim)

    # -- constants ------------------------------------------------------------------------------------------------
    def constant(self, name: str):
        """The value of `name` if it is a constant the graph holds inline (an initializer, a Constant node, or a few
        shape ops of those), else None. External (large) initializers are never read."""
        from onnx import TensorProto, helper, numpy_helper

        if not name:
            return None
        init = self.initializers.get(name)
        if init is not None:
            if init.data_location == TensorProto.EXTERNAL:
                return None
            return numpy_helper.to_array(init)
        node = self.producer.get(name)
        if node is None:
            return None
        if node.op_type == "Constant" and (node.domain or "") == "":
            a = node.attribute[0]
            value = helper.get_attribute_value(a)
            if a.name == "value":
                return numpy_helper.to_array(value)
            if a.name in ("value_int", "value_ints"):
                return np.array(value, np.int64)
            if a.name in ("value_float", "value_floats"):
                return np.array(value, np.float32)
            return None
        if (node.domain or "") != "" or node.op_type not in FOLDABLE:
            return None
        inputs = [self.constant(i) if i else None for i in node.input]
        if not inputs or inputs[0] is None:
            return None
        op, x = node.op_type, inputs[0]
        if op == "Identity":
            return x
        if op == "Cast":
            return x.astype(helper.tensor_dtype_to_np_dtype(attr(node, "to")))
        if op == "Concat":
            return None if any(v is None for v in inputs) else np.concatenate(inputs, axis=attr(node, "axis"))
        second = inputs[1] if len(inputs) > 1 else None
        if op == "Reshape":
            if second is None:
                return None
            dims = [x.shape[k] if d == 0 and not attr(node, "allowzero", 0) else int(d) for k, d in enumerate(second)]
            return x.reshape(dims)
        axes = attr(node, "axes") if second is None else [int(a) for a in second]
        if op == "Unsqueeze":
            if axes is None:
                return None
            rank = x.ndim + len(axes)
            for a in sorted(a % rank for a in axes):
                x = np.expand_dims(x, a)
            return x
        return np.squeeze(x, axis=None if axes is None else tuple(axes))

    def const(self, value, dtype=None, hint: str = "c") -> str:
        """An initializer holding `value` (shared by every rule that needs the same constant)."""
        from onnx import numpy_helper

        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            name = self.fresh(f"lowering/{hint}")
            self.model.graph.initializer.append(numpy_helper.from_array(array, name))
            self._constants[key] = name
        return self._constants[key]


class Builder:
    """Collects the nodes that replace one node. Tensor and node names derive from the replaced node's name."""

    def __init__(self, ctx: Lowering, node) -> None:
        self.ctx, self.node, self.nodes = ctx, node, []
        self.prefix = node.name or node.output[0]

    def op(self, op_type: str, inputs: list[str], outputs=None, domain: str = "", **attrs):
        """Append a node; `outputs` is a list of names to write, or a count of fresh names (default 1). Returns
        the output name (one output) or the list of names."""
        from onnx import helper

        if outputs is None or isinstance(outputs, int):
            count = outputs or 1
            names = [self.ctx.fresh(f"{self.prefix}/{op_type}_out") for _ in range(count)]
        else:
            names = list(outputs)
        node = helper.make_node(op_type, list(inputs), names, name=self.ctx.fresh_node(f"{self.prefix}/{op_type}"),
                                domain=domain or None, **attrs)
        self.nodes.append(node)
        return names[0] if len(names) == 1 else names

    def const(self, value, dtype=None, hint: str = "c") -> str:
        return self.ctx.const(value, dtype, hint)

    def i64(self, values) -> str:
        return self.const(values, np.int64, "i64")

    def f32(self, value) -> str:
        return self.const(value, np.float32, "f32")

    def f32_after(self, value: float, after: str) -> str:
        """The float32 scalar `value`, available only once the tensor `after` exists: Where(Size(after) > -1, v, v).

        A lowered gradient must not compute anything from forward tensors alone: ORT's priority-based order runs
        such a node with the forward and keeps its output until the backward reads it (a Sigmoid(αx) of the MLP
        width per layer, measured). Scaling by this scalar ties a chain to the gradient input at no memory cost.
        `after` must have a dynamic shape (ORT folds Size of a static one)."""
        size = self.op("Size", [after])
        open_ = self.op("Greater", [size, self.const(-1, np.int64, "i64")])
        return self.op("Where", [open_, self.f32(value), self.f32(value)])

    # -- ops whose form depends on the opset ----------------------------------------------------------------------
    def reduce(self, op_type: str, x: str, axes: list[int] | None, keepdims: int, output=None) -> str:
        """ReduceSum / ReduceMean over `axes` (None: all), with axes as an input where the opset wants one."""
        as_input = self.ctx.opset >= (13 if op_type == "ReduceSum" else 18)
        if axes is None:
            return self.op(op_type, [x], output, keepdims=keepdims)
        if as_input:
            return self.op(op_type, [x, self.i64(list(axes))], output, keepdims=keepdims)
        return self.op(op_type, [x], output, axes=list(axes), keepdims=keepdims)

    def unsqueeze(self, x: str, axes: list[int], output=None) -> str:
        return self.op("Unsqueeze", [x, self.i64(list(axes))], output)

    def squeeze(self, x: str, axes: list[int], output=None) -> str:
        return self.op("Squeeze", [x, self.i64(list(axes))], output)

    def int64(self, x: str) -> str:
        """x as int64 (a Cast unless x is known to be int64 already)."""
        from onnx import TensorProto

        if self.ctx.elem_type(x) == TensorProto.INT64:
            return x
        return self.op("Cast", [x], to=TensorProto.INT64)


class Types:
    """Element type and rank of graph tensors: what the graph declares (inputs, outputs, value_info,
    initializers), else inferred on demand through the producers (ONNX's per-node inference for standard ops, a
    rank rule for the com.microsoft ops of ORT's training graphs)."""

    def __init__(self, model, producer: dict) -> None:
        from onnx import helper

        graph = model.graph
        self.model, self.producer = model, producer
        self.initializers = {i.name: i for i in graph.initializer}
        self.known: dict = {}
        for v in (*graph.input, *graph.output, *graph.value_info):
            if v.type.HasField("tensor_type"):
                self.known[v.name] = v.type
        for init in graph.initializer:
            self.known[init.name] = helper.make_tensor_type_proto(init.data_type, list(init.dims))
        self.failed: set[str] = set()

    def get(self, name: str):
        if not name:
            return None
        if name in self.known or name in self.failed:
            return self.known.get(name)
        stack, visiting = [name], set()
        while stack:
            top = stack[-1]
            if top in self.known or top in self.failed:
                stack.pop()
                continue
            node = self.producer.get(top)
            if node is None:
                self.failed.add(top)
                stack.pop()
                continue
            if top not in visiting:
                visiting.add(top)
                pending = [i for i in node.input if i and i not in self.known and i not in self.failed]
                if pending:
                    for i in pending:
                        if i in visiting:  # a cycle: give up on it
                            self.failed.add(i)
                        else:
                            stack.append(i)
                    continue
            self._infer(node)
            for o in node.output:
                if o and o not in self.known:
                    self.failed.add(o)
            stack.pop()
        return self.known.get(name)

    def _like(self, elem_type: int | None, rank: int | None):
        from onnx import helper

        if rank is None:
            return None
        return helper.make_tensor_type_proto(elem_type or 0, [None] * rank)

    def _rank(self, name: str) -> int | None:
        t = self.known.get(name)
        return len(t.tensor_type.shape.dim) if t is not None and t.tensor_type.HasField("shape") else None

    def _elem(self, name: str) -> int | None:
        t = self.known.get(name)
        return t.tensor_type.elem_type if t is not None else None

    def _infer(self, node) -> None:
        from onnx import TensorProto, helper

        op, ins, outs = node.op_type, list(node.input), list(node.output)
        out: dict = {}
        if (node.domain or "") in ("", "ai.onnx"):
            if op == "SimplifiedLayerNormalization":  # a contrib op in the ONNX domain
                out[outs[0]] = self.known.get(ins[0])
                if len(outs) > 1:
                    out[outs[1]] = self._like(TensorProto.FLOAT, self._rank(ins[0]))
            else:
                out = self._onnx_infer(node)
            inferred = out.get(outs[0])
            if op == "Unsqueeze" and len(ins) > 1 and (inferred is None or not inferred.tensor_type.HasField("shape")):
                # axes computed at run time (the passes' gates: an empty list) but of a known length
                axes = self.known.get(ins[1])
                dims = axes.tensor_type.shape.dim if axes is not None else []
                rank = self._rank(ins[0])
                if len(dims) == 1 and dims[0].HasField("dim_value") and rank is not None:
                    out[outs[0]] = self._like(self._elem(ins[0]), rank + dims[0].dim_value)
        elif op == "ConcatTraining":  # Concat (+ int64 [n])
            out = self._onnx_infer(helper.make_node("Concat", ins, outs[:1], axis=attr(node, "axis")))
            if len(outs) > 1:
                out[outs[1]] = helper.make_tensor_type_proto(TensorProto.INT64, [len(ins)])
        elif op == "SplitTraining":  # Split with sizes as an input
            out = self._onnx_infer(helper.make_node("Split", ins, outs, axis=attr(node, "axis", 0)))
        elif op == "FusedMatMul":
            ranks = [self._rank(i) for i in ins[:2]]
            if None not in ranks:
                out[outs[0]] = self._like(self._elem(ins[0]), max(ranks))
        else:  # ORT's elementwise gradients: the type of the input they are the gradient of
            like = {"QuickGelu": 0, "QuickGeluGrad": 1, "SoftmaxGrad_13": 1, "SoftmaxGrad": 1,
                    "SoftmaxCrossEntropyLossGrad": 1, "SimplifiedLayerNormalizationGrad": 1}.get(op)
            if like is not None and len(ins) > like:
                out[outs[0]] = self.known.get(ins[like])
            if op == "SimplifiedLayerNormalizationGrad" and len(outs) > 1 and len(ins) > 2:
                out[outs[1]] = self.known.get(ins[2])
            if op == "SliceGrad":
                shape = self.known.get(ins[1])
                dims = shape.tensor_type.shape.dim if shape is not None else []
                if len(dims) == 1 and dims[0].dim_value:
                    out[outs[0]] = self._like(self._elem(ins[0]), dims[0].dim_value)
            if op == "InPlaceAccumulatorV2":
                out[outs[0]] = helper.make_tensor_type_proto(TensorProto.BOOL, [1])
        for name, t in out.items():
            if t is not None and name:
                self.known[name] = t

    def _onnx_infer(self, node) -> dict:
        import onnx
        from onnx import shape_inference

        if not onnx.defs.has(node.op_type):
            return {}
        opset = next(o.version for o in self.model.opset_import if o.domain in ("", "ai.onnx"))
        try:
            schema = onnx.defs.get_schema(node.op_type, opset, "")
            types = {i: self.known[i] for i in node.input if i in self.known}
            data = {i: c for i in node.input if (c := self._small_constant(i)) is not None}
            return dict(shape_inference.infer_node_outputs(schema, node, types, data,
                                                           opset_imports=list(self.model.opset_import)))
        except Exception:  # noqa: BLE001 (ONNX cannot infer this node here: its outputs stay unknown)
            return {}

    def _small_constant(self, name: str):
        from onnx import TensorProto

        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.t.data_type == TensorProto.INT64:
                    return a.t
            return None
        init = self.initializers.get(name)
        if init is not None and init.data_type == TensorProto.INT64 and init.data_location != TensorProto.EXTERNAL:
            return init
        return None
