"""TrainingArgs: every `lars-ort train` option with its default and help, in one place.

The CLI flags are generated from these fields, and a TOML or YAML config file may set any of them; flags given on
the command line override the file (torchtune / mlx-lm style).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from lars_artifacts import LarsError


# The runtime's backends (lars_ort.engine): auto picks plain onnxruntime.
BACKENDS = ("auto", "ort", "ort-training")


def _opt(default, help: str, **meta):
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class TrainingArgs:
    data: str | None = _opt(None, "training data: .txt, or .jsonl lines of {text}, {prompt, completion} or {messages}")
    out: str | None = _opt(None, "run directory: checkpoints, metrics.jsonl, run.json")
    steps: int = _opt(100, "optimizer steps to train")
    batch_size: int = _opt(4, "sequences per step")
    seq_len: int = _opt(256, "tokens per sequence (text is packed into blocks of this length)")
    lr: float = _opt(2e-4, "peak learning rate (AdamW)")
    warmup_steps: int = _opt(10, "linear warm-up steps from 0 to --lr")
    schedule: str = _opt("cosine", "decay after warm-up: cosine, linear or constant", choices=("cosine", "linear",
                                                                                                "constant"))
    min_lr_ratio: float = _opt(0.1, "final learning rate as a fraction of --lr (cosine and linear)")
    mask_prompt: bool = _opt(True, "train on the completion only for {prompt, completion} and {messages} data")
    eval_data: str | None = _opt(None, "held-out data (same formats as --data)")
    eval_every: int = _opt(0, "evaluate on --eval-data every N steps (0: only at the end)")
    eval_batches: int = _opt(0, "cap on eval batches per evaluation (0: all)")
    save_every: int = _opt(50, "write a checkpoint every N steps (and always at the end)")
    keep_checkpoints: int = _opt(2, "how many recent checkpoints to keep")
    seed: int = _opt(0, "seed for the data order")
    threads: int = _opt(0, "ORT intra-op threads (0: ORT's default)")
    backend: str = _opt("auto", "ort: the bundle's standard-ONNX step on plain onnxruntime (auto picks it); "
                                "ort-training: ORT's training artifacts on onnxruntime-training 1.19.2 (which must "
                                "then be this environment's onnxruntime)", choices=BACKENDS)
    memory_arena: bool = _opt(False, "ORT's CPU arena and memory patterns: a little faster, ~1.4 GB more at 1024 "
                                     "tokens on SmolLM2 (README, Runtime memory settings)")
    memory_reuse: bool = _opt(False, "ORT's buffer reuse between tensors of one size: holds dead buffers until their "
                                     "reuse, ~0.6 GB more at 1024 tokens on SmolLM2 (README, Runtime memory settings)")
    mmap_threshold_mb: float = _opt(1.0, "tensors of at least this many MB get their own memory mapping, returned to "
                                         "the OS when freed (glibc; 0: glibc's default heap, which fragments: ~2x the "
                                         "peak RSS with recompute bundles, README Runtime memory settings)")
    resume: bool = _opt(False, "continue the run in --out from its latest checkpoint")
    progress: bool = _opt(True, "show a progress bar")

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f.name: f.metadata["help"] for f in fields(cls)}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> None:
        for name in ("steps", "batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise LarsError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise LarsError(f"--lr must be positive, got {self.lr}")
        if self.backend not in BACKENDS:
            raise LarsError(f"--backend {self.backend!r} is unknown; use one of {', '.join(BACKENDS)}")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise LarsError(f"--schedule {self.schedule!r} is unknown; use cosine, linear or constant")


def load_config_file(path: str) -> dict[str, Any]:
    """Read a TOML (.toml) or YAML (.yaml/.yml) file of TrainingArgs fields (dashes or underscores)."""
    p = Path(path)
    if not p.is_file():
        raise LarsError(f"config file {path} does not exist; pass an existing .toml or .yaml file")
    text = p.read_text()
    try:
        if p.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif p.suffix == ".json":
            data = json.loads(text)
        else:
            raise LarsError(f"config file {path} must end in .toml, .yaml or .yml")
    except LarsError:
        raise
    except Exception as e:  # tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError
        raise LarsError(f"config file {path} is not valid {p.suffix[1:].upper()}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise LarsError(f"config file {path} must hold a table of options, e.g. `steps = 100`")
    known = {f.name for f in fields(TrainingArgs)}
    out = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in known:
            raise LarsError(f"config file {path}: unknown option {key!r}; see `lars-ort train --help`")
        out[name] = value
    return out
