"""The machinery every pass shares: its context, its report, and the initializer helpers."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable


@dataclass
class PassContext:
    trainable: set[str]  # initializer names ORT will train (the adapters); passes must keep them as they are
    # LARS: lora_A parameter name -> projection basis P [d, k] (float32); empty for exact LoRA.
    lars_bases: dict = field(default_factory=dict)


@dataclass
class PassReport:
    name: str
    changed: int = 0
    skipped: list[str] = field(default_factory=list)  # one line each: what was left alone and why
    bytes_freed: int = 0                               # what the pass expects to free (per step or at load)
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GraphPass:
    name: str
    stage: str  # "forward" | "training"
    apply: Callable  # (onnx.ModelProto, PassContext) -> PassReport
    help: str = ""


def initializer_map(model) -> dict:
    return {init.name: init for init in model.graph.initializer}


def producers(model) -> dict:
    return {o: n for n in model.graph.node for o in n.output}


def consumers(model) -> dict[str, list]:
    out: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out
