"""What the passes share, on onnx_ir: the conversion around them, the walks of a training graph, the gates, a maker
of named nodes and the initializer helpers.

Why onnx_ir: its nodes are stable objects that know their inputs' producers and their outputs' uses, and a graph
inserts and removes nodes in place (protobuf passes had to track nodes by id(), insert by list index and find readers
by scanning every node). A pass declares `ir=True` (GraphPass) and run_passes hands it an `onnx_ir.Model`, converting
from and back to the ModelProto once around consecutive IR passes (every pass is one now; a protobuf pass would still
run in the same list).

The round trip keeps the graph: nodes, initializers (external ones stay references to their files, never read),
inputs and outputs serialize byte-identical. onnx_ir rewrites value_info (an entry for every initializer, none for
a value no node makes) and writes the default opset's domain explicitly; into_proto keeps the graph's own entries
and opsets as they were and adds only what the passes made, so a graph no pass changed comes back byte-identical
(passes here never change the type of a value that already exists).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ._base import GATE_NO_AXES, PASS_WEIGHTS, SHAPE_OPS, VIEW_OPS, PassContext


class Nodes:
    """A maker of one rewrite's nodes, with named outputs: `nodes(op, inputs, outputs, name, domain, **attributes)`.
    Inputs are given as Values or by name: a value it made, one of its `constants` (Values holding them, registered
    by the caller), or, with a `graph`, one of its initializers or of the values it had when the maker was made.
    Attributes are stored sorted by name, as onnx.helper.make_node stores them."""

    def __init__(self, constants: dict | None = None, graph=None):
        import onnx_ir as ir

        self.values = {name: ir.Value(name=name, shape=ir.Shape(a.shape),
                                      type=ir.TensorType(ir.DataType.from_numpy(a.dtype)),
                                      const_value=ir.tensor(a, name=name))
                       for name, a in (constants or {}).items()}
        self.constants = list(self.values.values())  # for the caller to register (graph.register_initializer)
        self.graph = graph
        self._existing = values_by_name(graph) if graph is not None else {}

    def value(self, x):
        """The Value `x` names (x itself if it is one)."""
        if not isinstance(x, str):
            return x
        if x in self.values:
            return self.values[x]
        if self.graph is not None and x in self.graph.initializers:
            return self.graph.initializers[x]
        return self._existing[x]

    def __call__(self, op: str, inputs: list, outputs: list[str], name: str, domain: str = "", **attributes):
        import onnx_ir as ir

        made = [ir.Value(name=o) for o in outputs]
        node = ir.node(op, [self.value(i) for i in inputs], dict(sorted(attributes.items())), domain=domain,
                       name=name, outputs=made)
        self.values.update((v.name, v) for v in made)
        return node


def ir_graph(model):
    """The onnx_ir Graph of `model`: an onnx_ir Graph or Model as it is, a ModelProto converted (its weights are
    never read)."""
    import onnx_ir as ir

    if isinstance(model, ir.Graph):
        return model
    return model.graph if isinstance(model, ir.Model) else to_ir(model, None).graph


def to_ir(model, weights_dir: str | None):
    """The onnx_ir Model of a ModelProto whose external-data initializers live under `weights_dir`."""
    import onnx_ir as ir

    ir_model = ir.serde.deserialize_model(model)
    ir.external_data.set_base_dir(ir_model.graph, weights_dir or ".")
    return ir_model


def edit_in_place(model, edit, weights_dir: str | None = None):
    """Run `edit` (onnx_ir Model -> anything) on a ModelProto: converted, edited, written back into `model` in place;
    returns what `edit` returned."""
    ir_model = to_ir(model, weights_dir)
    result = edit(ir_model)
    into_proto(ir_model, model)
    return result


def into_proto(ir_model, model) -> None:
    """Write an onnx_ir Model back into the ModelProto it came from (in place: the pipeline holds `model`)."""
    import onnx_ir as ir

    proto = ir.serde.serialize_model(ir_model)
    # value_info: the entries the graph had, as they were (onnx_ir drops those of values no node makes any more, which
    # ORT's training graph carries by the hundred), then what onnx_ir knows of new values, initializers left out
    had = list(model.graph.value_info)
    known = {v.name for v in had} | {i.name for i in proto.graph.initializer}
    new = [v for v in proto.graph.value_info if v.name not in known]
    del proto.graph.value_info[:]
    proto.graph.value_info.extend([*had, *new])
    # onnx_ir writes the default domain as an explicit "" (2 bytes more per graph); keep the entries as they were
    # and add only the opsets a pass brought in
    had = {(o.domain, o.version) for o in model.opset_import}
    added = [o for o in proto.opset_import if (o.domain, o.version) not in had]
    del proto.opset_import[:]
    proto.opset_import.extend([*model.opset_import, *added])
    for kept, into in ((model, proto), (model.graph, proto.graph)):  # an empty doc_string stays written if it was
        if kept.HasField("doc_string") and not into.HasField("doc_string"):
            into.doc_string = kept.doc_string
    model.CopyFrom(proto)


def read_rows(tensor, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of an initializer's value (axis 0). An external tensor's rows are read from its file in
    one read, without mapping the file (mapped pages count as resident memory until unmapped)."""
    import onnx_ir as ir

    if not isinstance(tensor, ir.ExternalTensor):
        return tensor.numpy()[start:stop]
    dtype = tensor.dtype.numpy()
    shape = tuple(tensor.shape.numpy())
    row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    with open(Path(tensor.base_dir) / tensor.location, "rb") as f:
        f.seek((tensor.offset or 0) + start * row)
        return np.fromfile(f, dtype, (stop - start) * row // dtype.itemsize).reshape((stop - start, *shape[1:]))


def new_initializer(graph, name: str, pieces, dtype: np.dtype, shape: tuple, context: PassContext,
                    size_threshold: int = 1024):
    """Register an initializer `name` of `shape` whose bytes come in `pieces` (C-contiguous arrays, in order) and
    return its Value. With a context.weights_dir and above size_threshold bytes the pieces go to PASS_WEIGHTS there
    as they come (external data: the tensor is never whole in memory); else inline."""
    import onnx_ir as ir

    from ..external_data import ExternalDataWriter

    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if context.weights_dir is None or nbytes <= size_threshold:
        tensor = ir.tensor(np.concatenate([np.asarray(p).reshape(-1) for p in pieces]).reshape(shape), name=name)
    else:
        with ExternalDataWriter(Path(context.weights_dir) / PASS_WEIGHTS) as writer:
            offset, length = writer.write(pieces)
        if length != nbytes:
            raise ValueError(f"{name}: {length} bytes written for a {shape} {np.dtype(dtype)} tensor")
        tensor = ir.ExternalTensor(PASS_WEIGHTS, offset, length, ir.DataType.from_numpy(np.dtype(dtype)),
                                   shape=ir.Shape(shape), name=name, base_dir=context.weights_dir)
    value = ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def shared_initializer(graph, name: str, value: np.ndarray):
    """The initializer `name` (a constant many nodes share), registered holding `value` unless a pass already did."""
    import onnx_ir as ir

    if name not in graph.initializers:
        graph.register_initializer(ir.Value(name=name, shape=ir.Shape(value.shape),
                                            type=ir.TensorType(ir.DataType.from_numpy(value.dtype)),
                                            const_value=ir.tensor(value, name=name)))
    return graph.initializers[name]


def gate_all(graph, prefix: str, tensors: list, after: list) -> tuple[list, list]:
    """Nodes computing Unsqueeze(t, axes=Size(after) · []) for each of `tensors` (the same values, any dtype; no axis
    is inserted and ORT's Unsqueeze aliases its input: nothing is copied), available only once every value in
    `after` exists; and the gated Values. Recompute passes gate a copy's input on a value of the backward so ORT
    cannot run the copy early and its common-subexpression elimination cannot merge it into the forward twin; it
    also keeps constant folding off a computation on initializers. `after` must have a dynamic shape (ORT folds Size
    of a static one)."""
    import onnx_ir as ir

    no_axes = shared_initializer(graph, GATE_NO_AXES, np.zeros(0, np.int64))
    out = lambda name: [ir.Value(name=name)]  # noqa: E731
    if len(after) == 1:
        nodes = [ir.node("Size", after, name=f"{prefix}/GateSize", outputs=out(f"{prefix}/gate_size"))]
    else:
        nodes = [ir.node("Size", [t], name=f"{prefix}/GateSize{k}", outputs=out(f"{prefix}/gate_size{k}"))
                 for k, t in enumerate(after)]
        total = nodes[0].outputs[0]  # Add, not Sum: Sum takes no int64
        for k, size in enumerate(nodes[1:len(after)], 1):
            name = f"{prefix}/gate_size" if k == len(after) - 1 else f"{prefix}/gate_sizes{k}"
            nodes.append(ir.node("Add", [total, size.outputs[0]], name=f"{prefix}/GateSizes{k}", outputs=out(name)))
            total = nodes[-1].outputs[0]
    opener = ir.node("Mul", [nodes[-1].outputs[0], no_axes], name=f"{prefix}/GateOpen",
                     outputs=out(f"{prefix}/gate_axes"))
    gates = [ir.node("Unsqueeze", [t, opener.outputs[0]], name=f"{prefix}/Gate{k if k else ''}",
                     outputs=out(f"{prefix}/gated" if len(tensors) == 1 else f"{prefix}/gated{k}"))
             for k, t in enumerate(tensors)]
    return [*nodes, opener, *gates], [g.outputs[0] for g in gates]


# -- walks over an onnx_ir graph ------------------------------------------------------------------------------------

def values_by_name(graph) -> dict:
    """Every value of the graph by name: its inputs, initializers and node outputs."""
    out = {v.name: v for v in graph.inputs}
    out.update(graph.initializers)
    out.update((v.name, v) for node in graph for v in node.outputs)
    return out


def backward_nodes(graph) -> list:
    """The nodes of an ORT training graph that run after the turn: everything downstream of the loss gradient's seed
    (ORT seeds the backward with an initializer "<loss>_grad"), in stored order. Nodes that neither need that seed
    nor are needed by it (Shape nodes, the LARS projection x·P) can run during the forward and are not counted. The
    training graph is not stored in topological order, so this walks uses from the seed."""
    seed = values_by_name(graph).get(f"{graph.outputs[0].name}_grad")
    seen, stack = set(), [seed] if seed is not None else []
    while stack:
        for use in stack.pop().uses():
            if use.node not in seen:
                seen.add(use.node)
                stack.extend(use.node.outputs)
    return [node for node in graph if node in seen]


def view_chain(value, stop: set | None = None) -> list:
    """[value, its view source, ..., the value that owns the buffer] (VIEW_OPS share their input's buffer in ORT);
    `stop` holds nodes not to walk into."""
    chain, node = [value], value.producer()
    while node is not None and node.op_type in VIEW_OPS and (stop is None or node not in stop):
        chain.append(node.inputs[0])
        node = node.inputs[0].producer()
    return chain


def saved_for_backward(graph, backward: list | None = None) -> dict:
    """Value made before the turn -> the backward nodes that read it (or a view of it), ignoring readers that only
    take its shape (SHAPE_OPS). These are the values alive at the turn from forward to backward."""
    backward = backward_nodes(graph) if backward is None else backward
    after_turn = set(backward)
    out: dict = {}
    for node in backward:
        if node.op_type in SHAPE_OPS:
            continue
        for value in node.inputs:
            made_by = value.producer() if value is not None else None
            if made_by is not None and made_by not in after_turn:
                out.setdefault(view_chain(value, after_turn)[-1], []).append(node)
    return out


def run_order(graph) -> list:
    """The graph's nodes in the order ORT runs them with the priority-based execution order the runtime sets: ORT's
    GraphViewer sorts by Kahn's algorithm and, among the nodes ready to run, takes Shape and Size first, then the
    lowest node index (the stored position; our graphs carry no backward-pass or priority attributes). Raises
    ValueError on a cycle."""
    import heapq

    nodes = list(graph)
    index = {node: i for i, node in enumerate(nodes)}
    users: list[list[int]] = [[] for _ in nodes]
    waiting = [0] * len(nodes)
    for i, node in enumerate(nodes):
        for before in {index[v.producer()] for v in node.inputs if v is not None and v.producer() in index}:
            users[before].append(i)
            waiting[i] += 1
    key = [(n.op_type not in SHAPE_OPS, i) for i, n in enumerate(nodes)]
    ready = [key[i] for i in range(len(nodes)) if not waiting[i]]
    heapq.heapify(ready)
    order = []
    while ready:
        _, i = heapq.heappop(ready)
        order.append(nodes[i])
        for user in users[i]:
            waiting[user] -= 1
            if not waiting[user]:
                heapq.heappush(ready, key[user])
    if len(order) != len(nodes):
        stuck = next(n for i, n in enumerate(nodes) if waiting[i])
        raise ValueError(f"the graph has a cycle through {stuck.op_type} {stuck.name}")
    return order


def clone_node(node, renamed: dict, suffix: str, name: str):
    """A copy of `node` named `name` reading renamed.get(input, input) and writing values named output + suffix;
    records each output's copy in `renamed` (keyed by value), so cloning a chain in order rewires it onto itself."""
    import onnx_ir as ir

    attributes = [ir.Attr(a.name, a.type, a.value) for a in node.attributes.values()]
    outputs = [ir.Value(name=f"{o.name}{suffix}" if o.name else "") for o in node.outputs]
    copy = ir.Node(node.domain, node.op_type, [renamed.get(v, v) for v in node.inputs], attributes,
                   outputs=outputs, name=name, overload=node.overload)
    renamed.update({o: c for o, c in zip(node.outputs, copy.outputs) if o.name})
    return copy


def redirect(readers, renamed: dict, which) -> None:
    """Point every input of `readers` that is one of the values `which` at its copy, renamed[value]."""
    for reader in readers:
        for k, value in enumerate(reader.inputs):
            if value in which:
                reader.replace_input_with(k, renamed[value])


def gate_of(value):
    """The node that opens the gate which made `value` (gate_all's Mul: its input 0 is the Size, or the sum of the
    Sizes, of what the gate waits for), or None if `value` is not gated."""
    alias = value.producer()
    if alias is None or alias.op_type != "Unsqueeze" or len(alias.inputs) < 2 or alias.inputs[1] is None:
        return None
    axes = alias.inputs[1].producer()
    return axes if axes is not None and axes.op_type == "Mul" and axes.inputs[1].name == GATE_NO_AXES else None


def gate_waits_for(opener) -> set:
    """The values a gate (gate_of's opener) waits for: the inputs of the Size nodes above it."""
    afters, stack = set(), [opener.inputs[0]]
    while stack:
        node = stack.pop().producer()
        if node is None:
            continue
        if node.op_type == "Size":
            afters.add(node.inputs[0])
        else:
            stack.extend(v for v in node.inputs if v is not None and v.producer() is not None)
    return afters


def ancestors(values, within: set | None = None, through=None) -> dict:
    """The nodes that make `values`, transitively, in the order a depth-first walk finds them (a dict used as an
    ordered set), entering only nodes in `within` (None: any) and not walking past a node for which `through(node)`
    is False (the node itself is included)."""
    found, stack = {}, list(values)
    while stack:
        value = stack.pop()
        node = value.producer() if value is not None else None
        if node is None or node in found or (within is not None and node not in within):
            continue
        found[node] = None
        if through is None or through(node):
            stack.extend(node.inputs)
    return found


def descendants(values, within: set | None = None, stop: set | None = None) -> dict:
    """The nodes that read `values`, transitively (an ordered set), entering only nodes
    in `within` (None: any) and not walking past the values in `stop`."""
    found, stack = {}, list(values)
    while stack:
        for use in stack.pop().uses():
            node = use.node
            if node in found or (within is not None and node not in within):
                continue
            found[node] = None
            stack.extend(v for v in node.outputs if not stop or v not in stop)
    return found


def insert_groups(graph, groups: list) -> None:
    """Insert each (stored index, nodes) group right before the node that was at that index when the groups were
    planned. Several groups for one index go the last planned first (the order the protobuf passes stored them in,
    inserting from the end of the node list)."""
    nodes = list(graph)
    ahead: dict = {}  # stored index -> the node now first at that place
    for at, new in sorted(groups, key=lambda group: -group[0]):
        graph.insert_before(ahead.get(at, nodes[at]), new)
        ahead[at] = new[0]
