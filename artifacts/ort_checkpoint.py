"""ONNX Runtime's training checkpoint file (the `checkpoint` of a bundle, and a run's saved state), in pure Python.

Plain onnxruntime cannot read or write these files (`load_checkpoint` / `save_checkpoint` exist only in the training
build), so this module reads and writes them with numpy and the standard library alone. A file this module writes
is loaded by onnxruntime-training (and so by ORT's C, C++, C#, Java and Swift training APIs), which continues
training from it exactly as from a file it saved itself; a file ORT saved is read here with everything ORT's own
loader sees: every parameter and its requires_grad flag, the AdamW state (both moments of every trainable
parameter, the group's step and initial learning rate) and the property bag.

The format (onnxruntime/core/flatbuffers/schema/ort_training_checkpoint.fbs; orttraining/.../checkpoint.cc) is a
FlatBuffer with file identifier "ODTC" and root table `Checkpoint`:

    Checkpoint      { version:int32; module_state:ModuleState; optimizer_groups:[OptimizerGroup];
                      property_bag:PropertyBag }
    ModuleState     { requires_grad_params:[Tensor]; frozen_params:[Tensor]; is_nominal_state:bool;
                      has_external_data:bool }
    OptimizerGroup  { group_name:string; step:int64; initial_learning_rate:float;
                      optimizer_states:[ParameterOptimizerState] }
    ParameterOptimizerState { param_name:string; momentums:[Tensor] }     # "momentum0", "momentum1" (AdamW)
    PropertyBag     { ints:[IntProperty]; floats:[FloatProperty]; strings:[StringProperty] }   # {name, value}
    Tensor (ort.fbs){ name:string; doc_string:string; dims:[int64]; data_type:int32; raw_data:[uint8];
                      string_data:[string]; external_data_offset:int64 = -1 }

onnxruntime-training 1.19.2 writes and accepts only checkpoint version 2 (kCheckpointVersion; its loader rejects
any other), which is what this module writes. The trainable parameters are in `requires_grad_params`, the others
in `frozen_params`; ORT's save_checkpoint writes each list, and the moments, sorted by name (the checkpoint that
generate_artifacts writes keeps the graph's order); this module writes them sorted by name as well.

The learning rate is not in the file: onnxruntime-training 1.19.2's Optimizer starts every session at its default
(0.001) whatever the file holds, until the app sets it or an LR scheduler derives it from the group's
initial_learning_rate and step. So `read_checkpoint` gives `learning_rate == initial_learning_rate`, except when
this module wrote a different `learning_rate`: that one is kept in the property bag as the float property
`lars.learning_rate` (LEARNING_RATE_PROPERTY; ORT carries it along as any other property) and given back as
`learning_rate`, not among `properties`.

Reading checks every offset, length and alignment against the file before it touches the bytes (as ORT's
FlatBuffers verifier does, and further: names, sizes and dtypes must agree): a truncated, zeroed or foreign file
raises `BundleError` naming the file, never crashes or hangs. Tensors stored in an external data file (what ORT does
for large checkpoints) and nominal checkpoints (names and shapes, no values) are reported as not supported.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .atomic import write_atomic
from .errors import BundleError

FILE_IDENTIFIER = b"ODTC"
CHECKPOINT_VERSION = 2  # what onnxruntime-training 1.19.2 writes (and the only version it loads)
SUPPORTED_VERSIONS = (1, 2)  # 1: the same tables without is_nominal_state
GROUP_NAME = "group0"  # ORT's one optimizer group
MOMENT_NAMES = ("momentum0", "momentum1")  # AdamW first and second moments, as ORT names them
LEARNING_RATE_PROPERTY = "lars.learning_rate"
MAX_BYTES = 2**31 - 1  # FlatBuffers' limit; ORT moves tensors to an external file before reaching it

# ort.fbs TensorDataType -> numpy (raw little-endian data); STRING (8), BFLOAT16 (16) and the float8 types are not
# supported. FLOAT16 (10) is read but not written: onnxruntime-training 1.19.2's loader rejects it.
_DTYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 4: np.uint16, 5: np.int16, 6: np.int32, 7: np.int64, 9: np.bool_,
           10: np.float16, 11: np.float64, 12: np.uint32, 13: np.uint64}
_TYPE_CODES = {np.dtype(v).newbyteorder("<"): k for k, v in _DTYPES.items() if k != 10}


@dataclass
class OptimizerState:
    """The AdamW state of ORT's one optimizer group."""
    step: int
    learning_rate: float
    initial_learning_rate: float
    first_moments: dict[str, np.ndarray]  # parameter name -> moment (same shape and dtype as the parameter)
    second_moments: dict[str, np.ndarray]
    group_name: str = GROUP_NAME


@dataclass
class OrtCheckpoint:
    parameters: dict[str, np.ndarray]  # every parameter, in file order (trainable ones first)
    requires_grad: dict[str, bool]  # writing: a parameter missing here is frozen
    optimizer: OptimizerState | None = None  # None if the file has no optimizer group
    properties: dict[str, int | float | str] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------

class _Damaged(Exception):
    """Internal: the reason a file is not a valid checkpoint (turned into one BundleError line)."""


class _Unsupported(Exception):
    """Internal: a valid checkpoint using a feature this reader does not support."""


class _Buffer:
    """Bounds-, alignment- and sanity-checked FlatBuffers access over the file's bytes."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.size = len(data)
        # Tensor and string bytes decoded so far: in a valid file each byte belongs to one tensor or string, so a
        # damaged file whose offsets make many objects share bytes cannot make the reader work (or allocate) more
        # than a few times the file's size.
        self.data_bytes = 0
        self.text_bytes = 0

    def check(self, pos: int, length: int, align: int, what: str) -> None:
        if pos < 0 or length < 0 or pos + length > self.size:
            raise _Damaged(f"{what} at byte {pos} runs past the end of the file ({self.size} bytes)")
        if pos % align:
            raise _Damaged(f"{what} at byte {pos} is misaligned")

    def scalar(self, fmt: str, pos: int, what: str):
        size = struct.calcsize(fmt)
        self.check(pos, size, size, what)
        return struct.unpack_from("<" + fmt, self.data, pos)[0]

    def offset(self, pos: int, what: str) -> int:
        """The position a uoffset at `pos` points to (always forward: FlatBuffers offsets are unsigned)."""
        value = self.scalar("I", pos, what)
        if value == 0 or value >= 2**31:
            raise _Damaged(f"{what} has an invalid offset")
        target = pos + value
        if target >= self.size:
            raise _Damaged(f"{what} points past the end of the file (truncated?)")
        return target

    def table(self, pos: int, what: str) -> "_Table":
        self.check(pos, 4, 4, what)
        vtable = pos - struct.unpack_from("<i", self.data, pos)[0]
        self.check(vtable, 4, 2, f"{what}'s field table")
        vsize, tsize = struct.unpack_from("<HH", self.data, vtable)
        if vsize < 4 or vsize % 2:
            raise _Damaged(f"{what}'s field table has an invalid size")
        self.check(vtable, vsize, 2, f"{what}'s field table")
        self.check(pos, tsize, 1, what)
        fields = struct.unpack_from(f"<{(vsize - 4) // 2}H", self.data, vtable + 4)
        return _Table(self, pos, tsize, fields, what)

    def vector(self, pos: int, elem_size: int, what: str) -> tuple[int, int]:
        """(count, position of the first element) of the vector at pos."""
        count = self.scalar("I", pos, f"{what}'s length")
        self.check(pos + 4, count * elem_size, 1, what)
        return count, pos + 4

    def string(self, pos: int, what: str) -> str:
        count, start = self.vector(pos, 1, what)
        self.check(start + count, 1, 1, f"{what}'s terminator")
        if self.data[start + count] != 0:
            raise _Damaged(f"{what} is not terminated")
        self.text_bytes += count
        if self.text_bytes > self.size:
            raise _Damaged("strings share bytes")
        try:
            return self.data[start:start + count].decode("utf-8")
        except UnicodeDecodeError:
            raise _Damaged(f"{what} is not UTF-8") from None


class _Table:
    def __init__(self, buf: _Buffer, pos: int, tsize: int, fields: tuple, what: str) -> None:
        self.buf, self.pos, self.tsize, self.fields, self.what = buf, pos, tsize, fields, what

    def _field(self, index: int, size: int, name: str) -> int | None:
        offset = self.fields[index] if index < len(self.fields) else 0
        if offset == 0:
            return None
        if offset < 4 or offset + size > self.tsize:
            raise _Damaged(f"{self.what}.{name} lies outside its table")
        return self.pos + offset

    def scalar(self, index: int, fmt: str, default, name: str):
        pos = self._field(index, struct.calcsize(fmt), name)
        return default if pos is None else self.buf.scalar(fmt, pos, f"{self.what}.{name}")

    def ref(self, index: int, name: str) -> int | None:
        pos = self._field(index, 4, name)
        return None if pos is None else self.buf.offset(pos, f"{self.what}.{name}")

    def table(self, index: int, name: str) -> _Table | None:
        pos = self.ref(index, name)
        return None if pos is None else self.buf.table(pos, f"{self.what}.{name}")

    def string(self, index: int, name: str, required: bool = True) -> str | None:
        pos = self.ref(index, name)
        if pos is None:
            if required:
                raise _Damaged(f"{self.what} has no {name}")
            return None
        return self.buf.string(pos, f"{self.what}.{name}")

    def tables(self, index: int, name: str, required: bool = False) -> list[_Table] | None:
        pos = self.ref(index, name)
        if pos is None:
            if required:
                raise _Damaged(f"{self.what} has no {name}")
            return None
        count, start = self.buf.vector(pos, 4, f"{self.what}.{name}")
        return [self.buf.table(self.buf.offset(start + 4 * i, f"{self.what}.{name}[{i}]"), f"{name}[{i}]")
                for i in range(count)]


def _tensor(table: _Table) -> tuple[str, np.ndarray]:
    buf = table.buf
    name = table.string(0, "name")
    table.what = f"tensor {name!r}"
    dims_pos = table.ref(2, "dims")
    if dims_pos is None:
        raise _Damaged(f"{table.what} has no dims")
    rank, start = buf.vector(dims_pos, 8, f"{table.what}.dims")
    if rank > 32:
        raise _Damaged(f"{table.what} has {rank} dimensions")
    buf.check(start, 8 * rank, 8, f"{table.what}.dims")
    dims = struct.unpack_from(f"<{rank}q", buf.data, start)
    if any(d < 0 for d in dims):
        raise _Damaged(f"{table.what} has a negative dimension")
    code = table.scalar(3, "i", 0, "data_type")
    if code not in _DTYPES:
        if 1 <= code <= 20:  # a type of ort.fbs's TensorDataType: string, bfloat16, complex or float8
            raise _Unsupported(f"{table.what} has data type {code} (only raw numeric tensors are supported)")
        raise _Damaged(f"{table.what} has an unknown data type {code}")
    dtype = np.dtype(_DTYPES[code]).newbyteorder("<")
    raw_pos = table.ref(4, "raw_data")
    if raw_pos is None:
        if table.scalar(6, "q", -1, "external_data_offset") >= 0:
            raise _Unsupported(f"{table.what} is stored in an external data file")
        raise _Damaged(f"{table.what} has no data")
    length, start = buf.vector(raw_pos, 1, f"{table.what}.raw_data")
    if length != math.prod(dims) * dtype.itemsize:
        raise _Damaged(f"{table.what} holds {length} bytes, its shape {list(dims)} and type need "
                       f"{math.prod(dims) * dtype.itemsize}")
    buf.data_bytes += length
    if buf.data_bytes > buf.size:
        raise _Damaged("tensors share data")
    array = np.frombuffer(buf.data, dtype=dtype, count=math.prod(dims), offset=start).reshape(dims)
    return name, array.astype(dtype.newbyteorder("="), copy=True)


def _tensors(tables: list[_Table], kind: str) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for table in tables:
        name, array = _tensor(table)
        if name in out:
            raise _Damaged(f"{kind} {name!r} appears twice")
        out[name] = array
    return out


def _parse(data: bytes) -> OrtCheckpoint:
    buf = _Buffer(data)
    if buf.size < 8 or data[4:8] != FILE_IDENTIFIER:
        raise _Damaged("it lacks the ODTC file identifier")
    root = buf.table(buf.offset(0, "root"), "checkpoint")
    version = root.scalar(0, "i", 0, "version")
    if version not in SUPPORTED_VERSIONS:
        raise _Unsupported(f"checkpoint format version {version} (this reader knows versions "
                           f"{', '.join(map(str, SUPPORTED_VERSIONS))})")

    parameters: dict[str, np.ndarray] = {}
    requires_grad: dict[str, bool] = {}
    module = root.table(1, "module_state")
    if module is not None:
        if module.scalar(3, "B", 0, "has_external_data"):
            raise _Unsupported("its tensors are stored in an external data file (ORT does so for large "
                               "checkpoints)")
        if module.scalar(2, "B", 0, "is_nominal_state"):
            raise _Unsupported("it is a nominal checkpoint (parameter names and shapes, no values)")
        trainable = _tensors(module.tables(0, "requires_grad_params", required=True), "parameter")
        frozen = _tensors(module.tables(1, "frozen_params", required=True), "parameter")
        for name in frozen:
            if name in trainable:
                raise _Damaged(f"parameter {name!r} appears twice")
        for grad, part in ((True, trainable), (False, frozen)):
            for name, value in part.items():
                parameters[name] = value
                requires_grad[name] = grad

    optimizer = None
    groups = root.tables(2, "optimizer_groups") or []
    if len(groups) > 1:
        raise _Unsupported(f"{len(groups)} optimizer groups (ORT writes one)")
    for group in groups:
        group_name = group.string(0, "group_name")
        step = group.scalar(1, "q", 0, "step")
        initial_lr = group.scalar(2, "f", 0.0, "initial_learning_rate")
        if step < 0:
            raise _Damaged(f"optimizer step {step} is negative")
        moments: tuple[dict, dict] = ({}, {})
        for state in group.tables(3, "optimizer_states", required=True):
            param = state.string(0, "param_name")
            state.what = f"optimizer state of {param!r}"
            if param in moments[0] or param in moments[1]:
                raise _Damaged(f"optimizer state of {param!r} appears twice")
            named = _tensors(state.tables(1, "momentums", required=True), f"moment of {param!r}")
            if sorted(named) != sorted(MOMENT_NAMES):
                raise _Unsupported(f"optimizer state of {param!r} holds {sorted(named)}, not AdamW's "
                                   f"{list(MOMENT_NAMES)}")
            if param not in parameters:
                raise _Damaged(f"optimizer state of {param!r}, which is no parameter")
            for kind, moment_name in enumerate(MOMENT_NAMES):
                value = named[moment_name]
                if value.shape != parameters[param].shape or value.dtype != parameters[param].dtype:
                    raise _Damaged(f"{moment_name} of {param!r} has shape {list(value.shape)} {value.dtype}, the "
                                   f"parameter {list(parameters[param].shape)} {parameters[param].dtype}")
                moments[kind][param] = value
        optimizer = OptimizerState(step=step, learning_rate=initial_lr, initial_learning_rate=initial_lr,
                                   first_moments=moments[0], second_moments=moments[1], group_name=group_name)

    properties: dict[str, int | float | str] = {}
    bag = root.table(3, "property_bag")
    if bag is not None:
        for index, kind, fmt in ((0, "ints", "q"), (1, "floats", "f"), (2, "strings", None)):
            for prop in bag.tables(index, kind) or []:
                name = prop.string(0, "name")
                prop.what = f"property {name!r}"
                if name in properties:
                    raise _Damaged(f"property {name!r} appears twice")
                properties[name] = (prop.string(1, "value") if fmt is None
                                    else prop.scalar(1, fmt, 0 if fmt == "q" else 0.0, "value"))
    if optimizer is not None and isinstance(properties.get(LEARNING_RATE_PROPERTY), float):
        optimizer.learning_rate = properties.pop(LEARNING_RATE_PROPERTY)
    return OrtCheckpoint(parameters=parameters, requires_grad=requires_grad, optimizer=optimizer,
                         properties=properties)


def read_checkpoint(path: str | os.PathLike) -> OrtCheckpoint:
    """Every parameter, its requires_grad flag, the AdamW state and the property bag of ORT's training checkpoint
    file at `path`. Raises BundleError (one line, naming the file) if it is missing, damaged or not such a file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_BYTES:
                raise BundleError(f"{path} is not an ORT training checkpoint: {size} bytes, more than a "
                                  f"checkpoint file can hold")
            data = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise BundleError(f"cannot read ORT training checkpoint {path}: {e.strerror or e}") from None
    try:
        return _parse(data)
    except _Unsupported as e:
        raise BundleError(f"ORT training checkpoint {path} is not supported: {e}") from None
    except _Damaged as e:
        raise BundleError(f"{path} is damaged or not an ORT training checkpoint: {e}") from None
    except (ValueError, TypeError, OverflowError, MemoryError, struct.error, IndexError) as e:
        raise BundleError(f"{path} is damaged or not an ORT training checkpoint: "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------

class _OutTable:
    """A table to write: fields as (index, kind, value); kind: "bool", "i32", "i64", "f32" or "ref" (a node)."""

    def __init__(self, *fields) -> None:
        self.fields = [f for f in fields if f[2] is not None]


class _OutVector:
    """A vector of nodes (tables or strings)."""

    def __init__(self, items: list) -> None:
        self.items = items


class _OutScalars:
    """A vector of scalars: `data` its little-endian bytes, `count` its length (in elements); `align` the
    alignment of its first element (raw tensor data gets 16, so a reader could map it as an aligned array)."""

    def __init__(self, data, count: int, align: int) -> None:
        self.data, self.count, self.align = data, count, align


_SCALARS = {"bool": "B", "i32": "i", "i64": "q", "f32": "f"}


class _Writer:
    """Lays the objects out front to back (a parent before its children, so every uoffset points forward), each
    aligned to its absolute file position as FlatBuffers' verifier requires. Small bytes accumulate in bytearrays;
    large tensor data is kept as a reference to the caller's array until the file is written."""

    def __init__(self) -> None:
        self.parts: list = [bytearray()]
        self.size = 0

    def put(self, data: bytes) -> None:
        self.parts[-1] += data
        self.size += len(data)

    def pad(self, align: int, extra: int = 0) -> None:
        """Pad so that the position `extra` bytes on is a multiple of `align`."""
        self.put(b"\0" * (-(self.size + extra) % align))

    def slot(self) -> tuple[bytearray, int, int]:
        """Reserve a 4-byte uoffset here; (its bytearray, its index in it, its position)."""
        self.pad(4)
        part = self.parts[-1]
        where = (part, len(part), self.size)
        self.put(b"\0\0\0\0")
        return where

    @staticmethod
    def patch(slot: tuple[bytearray, int, int], target: int) -> None:
        part, index, pos = slot
        struct.pack_into("<I", part, index, target - pos)

    def node(self, node) -> int:
        """Write `node` (and everything below it) at the current position; return where it starts."""
        if isinstance(node, str):
            raw = node.encode("utf-8")
            self.pad(4)
            start = self.size
            self.put(struct.pack("<I", len(raw)) + raw + b"\0")
            return start
        if isinstance(node, _OutScalars):
            self.pad(max(node.align, 4), 4)
            start = self.size
            self.put(struct.pack("<I", node.count))
            if len(node.data) > 4096:
                self.parts.append(node.data)
                self.parts.append(bytearray())
                self.size += len(node.data)
            else:
                self.put(bytes(node.data))
            return start
        if isinstance(node, _OutVector):
            self.pad(4)
            start = self.size
            self.put(struct.pack("<I", len(node.items)))
            slots = [self.slot() for _ in node.items]
            for slot, item in zip(slots, node.items):
                self.patch(slot, self.node(item))
            return start
        return self._table(node)

    def _table(self, table: _OutTable) -> int:
        # Field layout inside the table: after the 4-byte soffset, largest fields first, each aligned absolutely.
        nfields = 1 + max((index for index, _, _ in table.fields), default=-1)
        vsize = 4 + 2 * nfields
        self.pad(2)
        vtable = self.size
        start = vtable + vsize
        start += -start % 4
        if any(kind == "i64" for _, kind, _ in table.fields) and start % 8 == 0:
            start += 4  # so the first 8-byte field (right after the soffset) is 8-aligned
        offsets = [0] * nfields
        end = start + 4
        order = sorted(table.fields, key=lambda f: -(4 if f[1] == "ref" else struct.calcsize(_SCALARS[f[1]])))
        for index, kind, _ in order:
            size = 4 if kind == "ref" else struct.calcsize(_SCALARS[kind])
            end += -end % size
            offsets[index] = end - start
            end += size
        tsize = end - start
        self.put(struct.pack(f"<HH{nfields}H", vsize, tsize, *offsets))
        self.put(b"\0" * (start - self.size))
        body = bytearray(tsize)
        struct.pack_into("<i", body, 0, start - vtable)
        refs = []
        for index, kind, value in table.fields:
            if kind == "ref":
                refs.append((offsets[index], value))
            else:
                struct.pack_into("<" + _SCALARS[kind], body, offsets[index], value)
        part = self.parts[-1]
        base = len(part)
        self.put(bytes(body))
        for offset, value in refs:
            self.patch((part, base + offset, start + offset), self.node(value))
        return start


def _tensor_node(name: str, value: np.ndarray) -> _OutTable:
    array = np.asarray(value)
    dtype = array.dtype.newbyteorder("<")
    if dtype not in _TYPE_CODES:
        raise ValueError(f"tensor {name!r} has dtype {array.dtype}; an ORT checkpoint (as onnxruntime-training "
                         f"1.19.2 loads it) holds {', '.join(sorted(d.name for d in _TYPE_CODES))}")
    array = np.ascontiguousarray(array, dtype=dtype)
    dims = _OutScalars(struct.pack(f"<{array.ndim}q", *array.shape), array.ndim, 8)
    raw = _OutScalars(memoryview(array.reshape(-1)).cast("B"), array.nbytes, 16)
    return _OutTable((0, "ref", name), (2, "ref", dims), (3, "i32", _TYPE_CODES[dtype]), (4, "ref", raw))


def _encode(checkpoint: OrtCheckpoint) -> _Writer:
    params = checkpoint.parameters
    unknown = set(checkpoint.requires_grad) - set(params)
    if unknown:
        raise ValueError(f"requires_grad names {sorted(unknown)[:3]}, which are not among the parameters")
    trainable = sorted(n for n in params if checkpoint.requires_grad.get(n, False))
    frozen = sorted(n for n in params if not checkpoint.requires_grad.get(n, False))

    module = None
    if params:  # as ORT: no module state when there are no parameters
        module = _OutTable((0, "ref", _OutVector([_tensor_node(n, params[n]) for n in trainable])),
                           (1, "ref", _OutVector([_tensor_node(n, params[n]) for n in frozen])))

    properties = dict(checkpoint.properties)
    properties.pop(LEARNING_RATE_PROPERTY, None)  # ours: set below from the optimizer state only
    groups = []
    opt = checkpoint.optimizer
    if opt is not None:
        for kind, moments in (("first_moments", opt.first_moments), ("second_moments", opt.second_moments)):
            if set(moments) != set(trainable):
                missing, extra = sorted(set(trainable) - set(moments)), sorted(set(moments) - set(trainable))
                raise ValueError(f"optimizer {kind} must cover exactly the trainable parameters (missing "
                                 f"{missing[:3]}, not trainable {extra[:3]})")
            for name, value in moments.items():
                value, param = np.asarray(value), np.asarray(params[name])
                if value.shape != param.shape or value.dtype.newbyteorder("<") != param.dtype.newbyteorder("<"):
                    raise ValueError(f"optimizer {kind}[{name!r}] is {list(value.shape)} {value.dtype}, the "
                                     f"parameter {list(param.shape)} {param.dtype}")
        if int(opt.step) < 0:
            raise ValueError(f"optimizer step {opt.step} is negative")
        states = [_OutTable((0, "ref", name),
                            (1, "ref", _OutVector([_tensor_node(MOMENT_NAMES[0], opt.first_moments[name]),
                                                   _tensor_node(MOMENT_NAMES[1], opt.second_moments[name])])))
                  for name in trainable]
        groups.append(_OutTable((0, "ref", opt.group_name), (1, "i64", int(opt.step)),
                                (2, "f32", float(opt.initial_learning_rate)), (3, "ref", _OutVector(states))))
        if np.float32(opt.learning_rate) != np.float32(opt.initial_learning_rate):
            properties[LEARNING_RATE_PROPERTY] = float(opt.learning_rate)

    bag = None
    if properties:  # as ORT: sorted by name, split by type; no property bag when it is empty
        ints, floats, strings = [], [], []
        for name in sorted(properties):
            value = properties[name]
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, str, np.integer,
                                                                             np.floating)):
                raise ValueError(f"property {name!r} is a {type(value).__name__}; ORT's property bag holds int, "
                                 f"float and str")
            if isinstance(value, str):
                strings.append(_OutTable((0, "ref", name), (1, "ref", value)))
            elif isinstance(value, (int, np.integer)):
                if not -2**63 <= int(value) < 2**63:
                    raise ValueError(f"property {name!r} = {value} does not fit in an int64")
                ints.append(_OutTable((0, "ref", name), (1, "i64", int(value))))
            else:
                floats.append(_OutTable((0, "ref", name), (1, "f32", float(value))))
        bag = _OutTable((0, "ref", _OutVector(ints)), (1, "ref", _OutVector(floats)),
                        (2, "ref", _OutVector(strings)))

    root = _OutTable((0, "i32", CHECKPOINT_VERSION), (1, "ref", module), (2, "ref", _OutVector(groups)),
                     (3, "ref", bag))
    writer = _Writer()
    root_slot = writer.slot()
    writer.put(FILE_IDENTIFIER)
    writer.patch(root_slot, writer.node(root))
    if writer.size > MAX_BYTES:
        raise ValueError(f"the checkpoint would take {writer.size} bytes; an ORT checkpoint without external "
                         f"data holds at most {MAX_BYTES}")
    return writer


def write_checkpoint(path: str | os.PathLike, checkpoint: OrtCheckpoint) -> None:
    """Write `checkpoint` as ORT's training checkpoint file (format version 2, what onnxruntime-training 1.19.2
    loads) at `path`, atomically (lars_artifacts.atomic)."""
    write_atomic(path, _encode(checkpoint).parts, sync_dir=True)
