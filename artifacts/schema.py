"""The typed parts of manifest.json that both halves exchange: the exporter builds these objects and writes their
`to_dict()`; the runtime reads them back with `from_dict()`, which checks every field it will use and names the one
that is wrong (a damaged or hand-edited manifest is a one-line BundleError at load, not a KeyError mid-run).

- AdapterParameter: one trainable LoRA tensor (manifest adapter.parameters[i]).
- OrtStep: the plain-onnxruntime backend's models (manifest models.ort): the training step, the eval graph, the
  checkpoint, the step's input/output names, the AdamW it applies; its `zo` entry, ZoModels, the forward-only ones.
- WeightTensor: where one frozen initializer lies in the weights file (manifest weights.tensors[i]) and which graphs
  read it; the runtime maps it without a copy, so its dtype, shape, offset and length are checked before that.
- GraphIo: the graphs' interface (manifest io): batch inputs, what the training and eval graphs output, the logits'
  layout, the label that does not count, the opset.
- SpecialTokens: the tokenizer's special tokens the data pipeline uses (manifest tokens).
- MemoryPlan: the bundle's fitted memory model, the budget it was exported for and the stack --memory-budget chose
  (manifest memory); the runtime warns before a step predicted above the budget.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .errors import BundleError
from .memory_model import MemoryModel
from .session_settings import ARENA_REGIONS

_JSON_TYPES = {str: "a string", list: "a list", dict: "an object", bool: "true or false", int: "an integer"}


def _damaged(what: str) -> BundleError:
    return BundleError(f"{what}; the manifest is damaged, re-export the bundle with `lars-export`")


def _is_count(value: Any, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _object(data: Any, where: str) -> dict:
    if not isinstance(data, dict):
        raise _damaged(f"{where} must be an object, got {type(data).__name__}")
    return data


def _field(data: Any, key: str, kind: type, where: str, optional: bool = False):
    value = _object(data, where).get(key)
    if value is None and optional:
        return None
    if isinstance(value, bool) is not (kind is bool) or not isinstance(value, kind):
        got = "nothing" if key not in data else type(value).__name__
        raise _damaged(f"{where}.{key} must be {_JSON_TYPES[kind]}, got {got}")
    return value


def _strings(data: dict, key: str, where: str) -> list[str]:
    values = _field(data, key, list, where)
    if not all(isinstance(v, str) for v in values):
        raise _damaged(f"{where}.{key} must be a list of strings")
    return values


@dataclass(frozen=True)
class AdapterParameter:
    onnx_name: str     # the initializer's name in the exported graphs (and an input of the training step)
    peft_key: str      # its key in a PEFT adapter_model.safetensors
    shape: list[int]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "AdapterParameter":
        shape = _field(data, "shape", list, where)
        if not all(_is_count(d, minimum=1) for d in shape):
            raise _damaged(f"{where}.shape must be a list of positive integers, got {shape!r}")
        return cls(_field(data, "onnx_name", str, where), _field(data, "peft_key", str, where), list(shape))


@dataclass(frozen=True)
class ZoModels:
    """Forward-only (zeroth-order) training's models: `forward`, the training step pruned to its `loss` (also what
    evaluation runs); `file`, P adapter settings per run with outputs `losses`, or None and the `reason`."""

    forward: str | None = None
    loss: str | None = None
    file: str | None = None
    losses: str | None = None
    settings_axis: str | None = None
    reason: str | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None or k in ("forward", "file")}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "ZoModels":
        values = {k: _field(data, k, str, where, optional=True) for k in cls.__dataclass_fields__}
        if values["forward"] and not values["loss"]:
            raise _damaged(f"{where} names a forward model but no loss output")
        if values["file"] and not values["losses"]:
            raise _damaged(f"{where} names {values['file']} but not its losses output")
        return cls(**values)


@dataclass(frozen=True)
class OrtStep:
    """The plain-onnxruntime backend's step (manifest models.ort). Every adapter is an input of `training` by its
    onnx_name; `gradients` maps it to its gradient output."""

    training: str
    eval: str
    checkpoint: str
    inputs: list[str]          # the batch inputs, in the order input_ids, attention_mask, labels
    loss: str
    eval_loss: str
    gradients: dict[str, str]
    optimizer: dict[str, Any]  # {"name": "adamw", AdamWConfig's fields}: what ORT's optimizer_model.onnx applies
    strict_onnx: bool = False  # no com.microsoft op left
    lowering: dict[str, Any] = field(default_factory=dict)  # what the lowering stage replaced (a report)
    zo: ZoModels | None = None

    def to_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "zo"}
        if self.zo is not None:
            out["zo"] = self.zo.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "OrtStep":
        gradients = _field(data, "gradients", dict, where)
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in gradients.items()):
            raise _damaged(f"{where}.gradients must map adapter names to output names")
        optimizer = _field(data, "optimizer", dict, where)
        if optimizer.get("name") != "adamw":
            raise _damaged(f"{where}.optimizer is {optimizer.get('name')!r}; this lars applies adamw")
        zo = data.get("zo")
        return cls(training=_field(data, "training", str, where), eval=_field(data, "eval", str, where),
                   checkpoint=_field(data, "checkpoint", str, where), inputs=_strings(data, "inputs", where),
                   loss=_field(data, "loss", str, where), eval_loss=_field(data, "eval_loss", str, where),
                   gradients=dict(gradients), optimizer=dict(optimizer),
                   strict_onnx=bool(_field(data, "strict_onnx", bool, where, optional=True)),
                   lowering=dict(_field(data, "lowering", dict, where, optional=True) or {}),
                   zo=None if zo is None else ZoModels.from_dict(zo, f"{where}.zo"))


def _count(data: dict, key: str, where: str, optional: bool = False) -> int | None:
    """data[key] as an integer >= 0 (with `optional`, a missing or null value is None)."""
    value = data.get(key) if isinstance(data, dict) else None
    if optional and value is None:
        return None
    if not _is_count(value):
        raise _damaged(f"{where}.{key} must be an integer >= 0{' or null' if optional else ''}, got {value!r}")
    return value


@dataclass(frozen=True)
class WeightTensor:
    name: str
    offset: int         # bytes from the start of the weights file
    length: int         # bytes: the product of shape times the dtype's size
    dtype: str          # a numpy dtype name (float32, int8, uint8, float16)
    shape: list[int]
    models: list[str]   # the bundle's graphs that read it

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "WeightTensor":
        name = _field(data, "name", str, where)
        where = f"{where} ({name})"
        dtype = _field(data, "dtype", str, where)
        try:
            size = np.dtype(dtype).itemsize
        except TypeError:
            raise _damaged(f"{where}.dtype {dtype!r} is not a numpy dtype") from None
        shape = _field(data, "shape", list, where)
        if not all(_is_count(d) for d in shape):
            raise _damaged(f"{where}.shape must be a list of integers >= 0, got {shape!r}")
        length = _count(data, "length", where)
        if length != int(np.prod(shape, dtype=np.int64)) * size:
            raise _damaged(f"{where}.length {length} is not its shape {shape} of {dtype}")
        return cls(name, _count(data, "offset", where), length, dtype, list(shape), _strings(data, "models", where))


@dataclass(frozen=True)
class GraphIo:
    inputs: list[str]             # the batch inputs of every graph, in order (input_ids, attention_mask, labels)
    training_outputs: list[str]   # "loss", and the logits unless the chunked loss never forms them
    eval_outputs: list[str]
    logits_layout: str            # "[batch*sequence, vocab]": ORT's loss wants the classes on axis 1
    ignore_index: int             # the label of a position that is not predicted
    opset: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "GraphIo":
        ignore = _field(data, "ignore_index", int, where)
        return cls(_strings(data, "inputs", where), _strings(data, "training_outputs", where),
                   _strings(data, "eval_outputs", where), _field(data, "logits_layout", str, where), ignore,
                   _count(data, "opset", where))


@dataclass(frozen=True)
class SpecialTokens:
    """The tokenizer's special tokens (tokenizer_config.json repeats them beside the chat template). pad_token_id is
    the eos id where the tokenizer has no pad token; any id may be null (a tokenizer without that token)."""

    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    bos_token: str | None = None
    eos_token: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "SpecialTokens":
        _object(data, where)
        return cls(*(_count(data, k, where, optional=True) for k in ("bos_token_id", "eos_token_id", "pad_token_id")),
                   _field(data, "bos_token", str, where, optional=True),
                   _field(data, "eos_token", str, where, optional=True))


@dataclass(frozen=True)
class MemoryPlan:
    """What the bundle's memory was planned with: `model`, the memory model fitted to its stack (None in a bundle
    exported without one); `budget_bytes` and `max_seq_len`, the --memory-budget and the length it was planned for
    (None without a budget); `plan`, the stack the budget chose and every candidate's predicted peak (a report);
    `arena_regions`, how ORT's arena grows in the setting the budget was priced on (session_settings.ARENA_REGIONS;
    None without a budget), which the runtime's --arena-regions auto runs with."""

    model: MemoryModel | None = None
    budget_bytes: int | None = None
    max_seq_len: int | None = None
    plan: dict[str, Any] | None = None
    arena_regions: str | None = None

    def to_dict(self) -> dict:
        return {"model": None if self.model is None else self.model.to_dict(), "budget_bytes": self.budget_bytes,
                "max_seq_len": self.max_seq_len, "plan": self.plan, "arena_regions": self.arena_regions}

    def over_budget(self, batch: int, seq_len: int) -> str | None:
        """One line if a step of batch × seq_len tokens is predicted above the budget; None if it fits or the
        bundle has no budget."""
        if not self.budget_bytes or self.model is None:
            return None
        peak = self.model.peak_bytes(batch, seq_len)
        if peak <= self.budget_bytes:
            return None
        longest = self.model.max_seq_len(self.budget_bytes, batch)
        return (f"a step of batch {batch} x {seq_len} tokens is predicted to peak at {peak / 2**30:.2f} GB, above "
                f"this bundle's memory budget of {self.budget_bytes / 2**30:.2f} GB (planned for {self.max_seq_len} "
                f"tokens at batch 1); at batch {batch} it fits up to {longest} tokens: lower --seq-len or "
                f"--batch-size, or re-export with a larger --memory-budget")

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "MemoryPlan":
        fitted = _field(data, "model", dict, where, optional=True)  # checks that data is an object
        if fitted is not None:
            bad = [k for k in MemoryModel.__dataclass_fields__
                   if isinstance(fitted.get(k), bool) or not isinstance(fitted.get(k), (int, float))]
            if bad:
                raise _damaged(f"{where}.model.{bad[0]} must be a number, got {fitted.get(bad[0])!r}")
        regions = _field(data, "arena_regions", str, where, optional=True)  # (absent before it was recorded)
        if regions is not None and regions not in ARENA_REGIONS:
            raise _damaged(f"{where}.arena_regions must be one of {', '.join(ARENA_REGIONS)}, got {regions!r}")
        return cls(None if fitted is None else MemoryModel.from_dict(fitted),
                   _count(data, "budget_bytes", where, optional=True),
                   _count(data, "max_seq_len", where, optional=True),
                   _field(data, "plan", dict, where, optional=True), regions)
