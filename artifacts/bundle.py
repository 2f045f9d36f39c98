"""The bundle: the directory `lars-export` writes and `lars-ort` reads.

Both halves agree on it through this module only. It imports neither torch nor onnxruntime, so either side (and an
app that only wants to inspect a bundle) can use it.

Layout of a bundle directory:

    manifest.json          what is inside (schema below), with the sha256 of every other file
    training_step.onnx     the training step in standard ONNX (forward + loss + gradients as outputs): what plain
                           onnxruntime runs (the `ort` backend); manifest "models" says how to drive it
    training_model.onnx    ORT training graph: forward + loss + gradients (onnxruntime-training's APIs)
    eval_model.onnx        ORT eval graph: forward + loss
    zo_forward.onnx        the training step pruned to its loss (forward + memory passes, no gradient): forward-only
                           (zeroth-order) training, one adapter setting per run
    zo_step.onnx           the eval graph with P adapter settings per run and a loss per setting: forward-only
                           training's batched perturbations. manifest models.ort.zo names both (a bundle exported
                           before them: the eval graph serves, one setting per run)
    optimizer_model.onnx   ORT AdamW step
    checkpoint             ORT checkpoint: the trainable adapter tensors (B = 0, as PEFT initialises them); both
                           backends read it (lars_artifacts.ort_checkpoint)
    weights.onnx_data      frozen base weights, external data shared by the three graphs; manifest "weights"
                           indexes it so a runtime maps it once for all its sessions
    tokenizer.json         `tokenizers` tokenizer
    tokenizer_config.json  special tokens and the chat template
    config.json            the base model's Hugging Face config (for the PEFT adapter export)
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import BundleError
from .schema import (AdapterParameter, GraphIo, MemoryPlan, OrtStep, SpecialTokens, WeightTensor, _damaged,
                     _is_count)

FORMAT = "lars-bundle"
FORMAT_VERSION = 2  # 2: training_step.onnx (standard ONNX), "models" and "weights" in the manifest

MANIFEST = "manifest.json"
TRAINING_STEP = "training_step.onnx"
TRAINING_MODEL = "training_model.onnx"
EVAL_MODEL = "eval_model.onnx"
ZO_STEP = "zo_step.onnx"
ZO_FORWARD = "zo_forward.onnx"
OPTIMIZER_MODEL = "optimizer_model.onnx"
CHECKPOINT = "checkpoint"
WEIGHTS = "weights.onnx_data"
TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
MODEL_CONFIG = "config.json"

REQUIRED_FILES = (TRAINING_STEP, TRAINING_MODEL, EVAL_MODEL, OPTIMIZER_MODEL, CHECKPOINT, TOKENIZER, TOKENIZER_CONFIG, MODEL_CONFIG)

# Graph interface. Logits come out flattened to [batch*seq, vocab]: ORT's SoftmaxCrossEntropyLoss wants classes on
# axis 1, and an app reshapes them back with the batch shape it fed.
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
LABELS = "labels"
LOGITS = "logits"
IGNORE_INDEX = -100


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# may be absent; manifest_sha256 is absent from bundles written before it was added, which still load
OPTIONAL_FIELDS = {"memory", "manifest_sha256"}

# The JSON type of each manifest field (bool is no int here): the runtime indexes into them.
FIELD_TYPES = {"source_model": dict, "architecture": dict, "adapter": dict, "io": dict, "tokens": dict,
               "exporter": dict, "passes": list, "memory": dict, "models": dict, "weights": dict, "files": dict,
               "format": str, "format_version": int, "manifest_sha256": str}
JSON_TYPE_NAMES = {dict: "an object", list: "an array", str: "a string", int: "an integer"}

# The backends a bundle serves, as keys of manifest["models"].
ORT_BACKEND = "ort"                    # plain onnxruntime: training_step.onnx + eval_model.onnx, AdamW in the runtime
ORT_TRAINING_BACKEND = "ort-training"  # onnxruntime-training's Module/Optimizer on ORT's own artifacts


@dataclass(frozen=True)
class AdamWConfig:
    """What onnxblock's AdamW writes into optimizer_model.onnx (lars-export's defaults); the manifest records it
    (ort.optimizer) and the plain-onnxruntime backend applies it (lars_ort.optimizer)."""

    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-6
    weight_decay: float = 0.0
    correct_bias: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Manifest:
    """manifest.json. `files` maps each file name to {"sha256", "bytes"}."""

    source_model: dict[str, Any]
    architecture: dict[str, Any]
    adapter: dict[str, Any]
    io: dict[str, Any]      # GraphIo.to_dict()
    tokens: dict[str, Any]  # SpecialTokens.to_dict()
    exporter: dict[str, Any]
    passes: list[dict[str, Any]] = field(default_factory=list)
    memory: dict[str, Any] = field(default_factory=dict)  # MemoryPlan.to_dict()
    # backend -> its step models. "ort": {"training", "eval", "checkpoint" (file names), "inputs" (the batch inputs;
    # every adapter is an input too, by its onnx_name), "loss" (output name), "gradients" (adapter -> output name),
    # "optimizer" ({"name": "adamw", beta1, beta2, eps, weight_decay, correct_bias}: ORT's AdamW, adam_mode 1),
    # "lowering" (what the lowering stage replaced), "strict_onnx" (no com.microsoft op left)}.
    # "ort-training": {"training", "eval", "optimizer", "checkpoint"} (ORT's artifacts).
    models: dict[str, Any] = field(default_factory=dict)
    # {"file": WEIGHTS, "tensors": [{"name", "offset", "length", "dtype", "shape", "models": [file names]}]}: where
    # each frozen initializer lies in the external-data file and which graphs read it.
    weights: dict[str, Any] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    # sha256 of the manifest's own content (manifest_digest): the file hashes above guard the other files, this
    # guards them and everything else the manifest says. Set by write_manifest.
    manifest_sha256: str = ""

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> "Manifest":
        if data.get("format") != FORMAT:
            raise BundleError(f"{where} is not a lars bundle manifest (format={data.get('format')!r}); "
                              f"export one with `lars-export`")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise BundleError(f"{where} has bundle format version {version}, this lars reads version {FORMAT_VERSION}; "
                              f"re-export the model with this lars (`lars-export`)")
        names = [f for f in cls.__dataclass_fields__]
        missing = [n for n in names if n not in data and n not in OPTIONAL_FIELDS]
        if missing:
            raise BundleError(f"{where} lacks {', '.join(missing)}; the file is damaged, re-export the bundle")
        for name in names:
            if name in data:
                _check_json_type(data[name], FIELD_TYPES[name], f"{where}: {name}")
        _check_files(data["files"], where)
        _check_runtime_fields(data, where)
        return cls(**{n: data[n] for n in names if n in data})

    # Convenience views used by the runtime.
    @property
    def vocab_size(self) -> int:
        return int(self.architecture["vocab_size"])

    @property
    def max_seq_len(self) -> int:
        return int(self.architecture["max_position_embeddings"])

    @property
    def adapter_parameters(self) -> list[AdapterParameter]:
        return [AdapterParameter.from_dict(p, f"adapter.parameters[{i}]")
                for i, p in enumerate(self.adapter["parameters"])]

    @property
    def graph_io(self) -> GraphIo:
        return GraphIo.from_dict(self.io, "io")

    @property
    def special_tokens(self) -> SpecialTokens:
        return SpecialTokens.from_dict(self.tokens, "tokens")

    @property
    def memory_plan(self) -> MemoryPlan:
        """The memory model, budget and plan the bundle was exported with (all None in one without)."""
        return MemoryPlan.from_dict(self.memory, "memory")

    @property
    def ort_step(self) -> OrtStep | None:
        """The plain-onnxruntime backend's models (None in a bundle exported before that backend)."""
        spec = self.models.get(ORT_BACKEND)
        return OrtStep.from_dict(spec, f"models.{ORT_BACKEND}") if spec else None

    @property
    def weight_tensors(self) -> list[WeightTensor]:
        """The weights file's index (empty for a bundle whose weights are inside its graphs)."""
        return [WeightTensor.from_dict(t, f"weights.tensors[{i}]")
                for i, t in enumerate(self.weights.get("tensors", []))]

    @property
    def bundle_id(self) -> str:
        """Identifies the bundle a run belongs to: the hash of its initial checkpoint and training graph."""
        return hashlib.sha256((self.files[CHECKPOINT]["sha256"] + self.files[TRAINING_MODEL]["sha256"]).encode()
                              ).hexdigest()[:16]



def _check_json_type(value: Any, expected: type, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, expected):  # JSON true is no integer
        raise _damaged(f"{what} must be {JSON_TYPE_NAMES[expected]}, got {type(value).__name__}")



def _check_files(files: dict[str, Any], where: str) -> None:
    """Each entry is a plain file name in the bundle directory with {"sha256": 64 hex digits, "bytes": size}."""
    for name, info in files.items():
        entry = f"{where}: files entry {name!r}"
        if name in ("", ".", "..") or Path(name).name != name or "\\" in name or "\0" in name:
            raise _damaged(f"{entry} is not a file name in the bundle directory")
        if not isinstance(info, dict):
            raise _damaged(f"{entry} must be an object with sha256 and bytes")
        for key in ("sha256", "bytes"):
            if key not in info:
                raise _damaged(f"{entry} lacks {key!r}")
        if not _is_count(info["bytes"]):
            raise _damaged(f"{entry} has bytes {info['bytes']!r}, not a size")
        digest = info["sha256"]
        if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
            raise _damaged(f"{entry} has sha256 {digest!r}, not 64 hex digits")


def _check_runtime_fields(data: dict[str, Any], where: str) -> None:
    """The nested fields the runtime reads directly: a gap here would otherwise be a KeyError mid-run."""
    for key in ("vocab_size", "max_position_embeddings"):
        if not _is_count(data["architecture"].get(key), minimum=1):
            raise _damaged(f"{where}: architecture.{key} must be a positive integer, "
                           f"got {data['architecture'].get(key)!r}")
    adapter = data["adapter"]
    _check_json_type(adapter.get("peft_config"), dict, f"{where}: adapter.peft_config")
    _check_json_type(adapter.get("parameters"), list, f"{where}: adapter.parameters")
    for n, parameter in enumerate(adapter["parameters"]):
        AdapterParameter.from_dict(parameter, f"{where}: adapter.parameters[{n}]")
    GraphIo.from_dict(data["io"], f"{where}: io")
    SpecialTokens.from_dict(data["tokens"], f"{where}: tokens")
    MemoryPlan.from_dict(data.get("memory", {}), f"{where}: memory")
    for n, tensor in enumerate(data.get("weights", {}).get("tensors", [])):
        WeightTensor.from_dict(tensor, f"{where}: weights.tensors[{n}]")
    if data.get("models", {}).get(ORT_BACKEND):
        OrtStep.from_dict(data["models"][ORT_BACKEND], f"{where}: models.{ORT_BACKEND}")


def manifest_digest(data: dict[str, Any]) -> str:
    """sha256 of a manifest's content but its own manifest_sha256, as canonical JSON (sorted keys, no spaces).

    Computed from the parsed JSON on both sides, so it does not depend on the file's layout.
    """
    content = {k: v for k, v in data.items() if k != "manifest_sha256"}
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def write_manifest(directory: str | os.PathLike, manifest: Manifest) -> Path:
    """Hash every file in `directory` (but the manifest) into the manifest, then the manifest itself, and write it."""
    directory = Path(directory)
    manifest.files = {}
    for path in sorted(directory.iterdir()):
        if path.is_file() and path.name != MANIFEST:
            manifest.files[path.name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    # hashed as load_bundle will read it back: tuples become lists, keys strings
    manifest.manifest_sha256 = manifest_digest(json.loads(manifest.to_json()))
    out = directory / MANIFEST
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(manifest.to_json())
    os.replace(tmp, out)
    return out


@dataclass
class Bundle:
    path: Path
    manifest: Manifest

    def file(self, name: str) -> str:
        return str(self.path / name)


def load_bundle(directory: str | os.PathLike, verify: bool = True) -> Bundle:
    """Open and validate a bundle; every problem is a one-line BundleError naming the file and the fix."""
    directory = Path(directory)
    if not directory.is_dir():
        raise BundleError(f"bundle directory {directory} does not exist; create it with `lars-export --out {directory}`")
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"{manifest_path} is missing: {directory} is not a lars bundle; "
                          f"create one with `lars-export --out {directory}`")
    try:
        data = json.loads(manifest_path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        reason = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8 JSON text"
        raise BundleError(f"{manifest_path} is not valid JSON ({reason}); "
                          f"the bundle is damaged, re-export it with `lars-export`") from None
    if not isinstance(data, dict):
        raise BundleError(f"{manifest_path} is not a JSON object; the bundle is damaged, re-export it")
    manifest = Manifest.from_dict(data, str(manifest_path))
    # after from_dict, so a manifest of another format or version says that rather than that it changed
    if manifest.manifest_sha256 and manifest.manifest_sha256 != manifest_digest(data):
        raise BundleError(f"{manifest_path} does not match its own manifest_sha256: it was edited or damaged after "
                          f"export; re-export the bundle with `lars-export`")
    for name in REQUIRED_FILES:
        if name not in manifest.files:
            raise BundleError(f"{manifest_path} lists no {name}; the bundle is damaged, re-export it with `lars-export`")
    for name, info in manifest.files.items():
        path = directory / name
        if not path.is_file():
            raise BundleError(f"bundle file {path} is missing; copy the whole bundle directory or re-export it")
        if path.stat().st_size != info["bytes"]:
            raise BundleError(f"bundle file {path} has {path.stat().st_size} bytes, the manifest says {info['bytes']}: "
                              f"it is truncated or altered; copy it again or re-export the bundle")
        if verify and sha256_file(path) != info["sha256"]:
            raise BundleError(f"bundle file {path} does not match its sha256 in the manifest: it is corrupt or altered; "
                              f"copy it again or re-export the bundle")
    return Bundle(directory, manifest)
