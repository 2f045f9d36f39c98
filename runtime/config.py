"""TrainingArgs: every `lars-ort train` option with its default, help and valid range, in one place.

The CLI flags are generated from these fields, and a TOML, YAML or JSON config file may set any of them; flags given
on the command line override the file (torchtune / mlx-lm style). Every value is checked before any slow work: a bad
one is a one-line LarsError naming the option (and the config file it came from), never a traceback mid-run.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from lars_artifacts import LarsError
from lars_artifacts.session_settings import ARENA_REGIONS

from .schedule import learning_rate


# --arena-regions: how ORT's CPU arena grows (lars_artifacts.session_settings.ARENA_REGIONS), or "auto": the one the
# bundle's memory budget was priced on (exact regions), doubling for a bundle without a budget.
ARENA_CHOICES = ("auto", *ARENA_REGIONS)
# The runtime's backends (lars_ort.engine): auto picks plain onnxruntime.
BACKENDS = ("auto", "ort", "ort-training")
# Training methods (lars_ort.engine): gradients by backpropagation, or zeroth-order estimates from forwards (zo.py).
METHODS = ("backprop", "zo")
SCHEDULES = ("cosine", "linear", "constant")

# glibc caps M_MMAP_THRESHOLD at 32 MiB on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX) and ignores a larger one: a higher
# --mmap-threshold-mb would silently do nothing.
MAX_MMAP_THRESHOLD_MB = 32.0
# ORT takes an int32 thread count and starts that many threads; more than any device has cores is a typo.
MAX_THREADS = 1024


def _opt(default, help: str, **meta):
    """A field with its help; meta may bound it: minimum / maximum (inclusive), above (exclusive), choices, and
    say why a bound is what it is (why)."""
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class TrainingArgs:
    data: str | None = _opt(None, "training data: .txt, or .jsonl lines of {text}, {prompt, completion} or {messages}")
    out: str | None = _opt(None, "run directory: checkpoints, metrics.jsonl, run.json")
    steps: int = _opt(100, "optimizer steps to train", minimum=1)
    batch_size: int = _opt(4, "sequences per step", minimum=1)
    seq_len: int = _opt(256, "tokens per sequence (text is packed into blocks of this length)", minimum=1)
    lr: float = _opt(2e-4, "peak learning rate (AdamW)", above=0)
    warmup_steps: int = _opt(10, "linear warm-up steps from 0 to --lr", minimum=0)
    schedule: str = _opt("cosine", "decay after warm-up: cosine, linear or constant", choices=SCHEDULES)
    min_lr_ratio: float = _opt(0.1, "final learning rate as a fraction of --lr (cosine and linear)", minimum=0,
                               maximum=1)
    mask_prompt: bool = _opt(True, "train on the completion only for {prompt, completion} and {messages} data")
    eval_data: str | None = _opt(None, "held-out data (same formats as --data)")
    eval_every: int = _opt(0, "evaluate on --eval-data every N steps (0: only at the end)", minimum=0)
    eval_batches: int = _opt(0, "cap on eval batches per evaluation (0: all)", minimum=0)
    save_every: int = _opt(50, "write a checkpoint every N steps (0: only the one at the end, which is always written)",
                           minimum=0)
    keep_checkpoints: int = _opt(2, "how many recent checkpoints to keep", minimum=1)
    # numpy's default_rng takes no negative seed
    seed: int = _opt(0, "seed for the data order (and --method zo's perturbations)", minimum=0)
    threads: int = _opt(0, "ORT intra-op threads (0: the cores this process may use: its CPU affinity and cgroup "
                           "quota, else ORT's default of one per physical core)", minimum=0, maximum=MAX_THREADS)
    backend: str = _opt("auto", "ort: the bundle's standard-ONNX step on plain onnxruntime (auto picks it); "
                                "ort-training: ORT's training artifacts on onnxruntime-training 1.19.2 (which must "
                                "then be this environment's onnxruntime)", choices=BACKENDS)
    method: str = _opt("backprop", "backprop: gradients from the bundle's training step; zo: forward-only P-RGE "
                                   "(zeroth-order estimates from 2 x --zo-perturbations forwards per step, no "
                                   "gradient graph: the memory of inference; needs more steps and a smaller --lr, "
                                   "README Forward-only training)", choices=METHODS)
    zo_perturbations: int = _opt(4, "--method zo: random directions per step (q; a step runs 2q forwards)",
                                 minimum=1, maximum=4096)
    zo_eps: float = _opt(1e-3, "--method zo: perturbation scale (epsilon)", above=0, maximum=1.0)
    zo_eps_schedule: str = _opt("constant", "--method zo: epsilon over the run: constant, or linear / cosine decay "
                                            "to --min-lr-ratio x --zo-eps", choices=SCHEDULES)
    zo_parallel: int = _opt(1, "--method zo: adapter settings per forward: 1 (one at a time: the memory of one "
                               "forward) or an even number (pairs of +/- perturbations in one batched forward: "
                               "faster, that many times the activations)", minimum=1, maximum=8192)
    zo_lora_fa: bool = _opt(True, "--method zo: perturb and train the LoRA B matrices only (LoRA-FA; A keeps its "
                                  "initial value)")
    memory_arena: bool = _opt(True, "ORT's CPU arena (without memory patterns), shrunk at the end of every step: "
                                    "the step reuses its own freed blocks instead of page-faulting fresh memory "
                                    "(SmolLM2 at 1024 tokens: 1.9x faster, same peak; README, Runtime memory "
                                    "settings); --no-memory-arena: a malloc per tensor")
    arena_regions: str = _opt("auto", "how the arena grows: doubling (each new region twice the last) or exact "
                                      "(a region of the size asked for, in an arena ORT's environment holds): 8% "
                                      "lower peak for a 3B model at 4096 tokens, 6% higher at 2048; auto: exact "
                                      "for a bundle exported with --memory-budget (the setting its budget is "
                                      "validated on), doubling otherwise (docs/BENCHMARKS.md, The arena with "
                                      "exact-size regions)",
                              choices=ARENA_CHOICES)
    memory_reuse: bool = _opt(False, "ORT's buffer reuse between tensors of one size: holds dead buffers until their "
                                     "reuse, ~0.6 GB more at 1024 tokens on SmolLM2 (README, Runtime memory settings)")
    mmap_threshold_mb: float = _opt(1.0, "with --no-memory-arena (or exact arena regions): tensors (arena "
                                         "regions) of at least this many MB get their own memory mapping, returned "
                                         "to the OS when freed (glibc; 0: glibc's default "
                                         "heap, which fragments: ~2x the peak RSS with recompute bundles, README "
                                         "Runtime memory settings)",
                                    minimum=0, maximum=MAX_MMAP_THRESHOLD_MB,
                                    why="glibc ignores a larger threshold")
    resume: bool = _opt(False, "continue the run in --out from its newest intact checkpoint (from step 0 if it has "
                               "none yet)")
    resume_with_changes: bool = _opt(False, "with --resume: accept a changed --seed, --batch-size, --seq-len, --lr, "
                                            "schedule or --steps (refused otherwise: the run would not continue as "
                                            "it was started)")
    max_skipped_steps: int = _opt(5, "stop the run when this many steps in a row have a NaN/inf loss or gradient "
                                     "(each such step is skipped, not applied)", minimum=1)
    progress: bool = _opt(True, "show a progress bar")

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f.name: f.metadata["help"] for f in fields(cls)}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> None:
        """Check every field (type and range) and that --out can hold a run; an int for a float becomes a float."""
        for f in fields(self):
            value = getattr(self, f.name)
            problem = option_problem(f.name, value)
            if problem:
                raise LarsError(f"{flag(f.name)} {problem}")
            if f.type == "float" and not isinstance(value, float):
                setattr(self, f.name, float(value))  # `lr: 1` in a config file means 1.0
        problem = (ZoConfig.from_args(self).problem() or method_problem(self.method, self.backend)
                   or arena_problem(self.memory_arena, self.arena_regions))
        if problem:
            raise LarsError(problem)
        if self.out:
            check_output_directory(self.out, "--out")


_FIELDS = {f.name: f for f in fields(TrainingArgs)}


def flag(name: str) -> str:
    """The command-line flag of a TrainingArgs field."""
    return "--" + name.replace("_", "-")


def _shown(value: Any) -> str:
    """A value as an error message quotes it: repr (strings keep their quotes), kept to one short line."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def option_problem(name: str, value: Any) -> str | None:
    """What is wrong with `value` for the TrainingArgs field `name` ("must be ..., got ..."), or None."""
    f = _FIELDS[name]
    meta = f.metadata
    if f.type == "bool":
        return None if isinstance(value, bool) else f"must be true or false, got {_shown(value)}"
    if f.type in ("str", "str | None"):
        if value is None and f.type == "str | None":
            return None
        if not isinstance(value, str):
            return f"must be a string, got {_shown(value)}"
        if "choices" in meta and value not in meta["choices"]:
            return f"must be one of {', '.join(meta['choices'])}, got {_shown(value)}"
        if "\0" in value:  # no OS path holds one; os.stat would raise ValueError
            return f"must not contain a NUL character, got {_shown(value)}"
        return None
    # bool is an int subclass: `steps: true` is a mistake, not 1
    if f.type == "int" and (isinstance(value, bool) or not isinstance(value, int)):
        return f"must be an integer, got {_shown(value)}"
    if f.type == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be a number, got {_shown(value)}"
        try:
            finite = math.isfinite(value)
        except OverflowError:  # an int beyond any float
            finite = False
        if not finite:
            return f"must be a finite number, got {_shown(value)}"
    low, high, above = meta.get("minimum"), meta.get("maximum"), meta.get("above")
    why = f" ({meta['why']})" if "why" in meta else ""
    if above is not None and not value > above:
        return f"must be above {above}{why}, got {_shown(value)}"
    if low is not None and high is not None and not low <= value <= high:
        return f"must be between {low:g} and {high:g}{why}, got {_shown(value)}"
    if low is not None and value < low:
        return f"must be at least {low}{why}, got {_shown(value)}"
    if high is not None and value > high:
        return f"must be at most {high}{why}, got {_shown(value)}"
    return None


def arena_problem(memory_arena: bool, arena_regions: str) -> str | None:
    """Why the arena settings cannot go together, or None."""
    if arena_regions not in ARENA_CHOICES:
        return f"--arena-regions must be one of {', '.join(ARENA_CHOICES)}, got {_shown(arena_regions)}"
    if arena_regions == "exact" and not memory_arena:
        return (f"--arena-regions {arena_regions} sets how ORT's arena grows, and --no-memory-arena turns it off; "
                f"drop one")
    return None


def method_problem(method: str, backend: str) -> str | None:
    """What is wrong with training `method` on `backend`, or None."""
    if method not in METHODS:
        return f"--method {method!r} is unknown; use one of {', '.join(METHODS)}"
    if method == "zo" and backend == "ort-training":
        return "--method zo runs the bundle's forward on plain onnxruntime; drop --backend ort-training"
    return None


@dataclass(frozen=True)
class ZoConfig:
    """P-RGE settings of --method zo (lars_ort.zo): TrainingArgs' --zo-* options, or set directly by an app."""

    perturbations: int = 4          # q: directions per step (2q forward evaluations)
    eps: float = 1e-3               # ε: perturbation scale
    eps_schedule: str = "constant"  # ε over the run: constant, or linear / cosine decay to eps * eps_min_ratio
    eps_min_ratio: float = 0.1
    steps: int = 1                  # the run's length, for the ε schedule
    parallel: int = 1               # adapter settings per forward: 1, or an even number (pairs of ±)
    lora_fa: bool = True            # perturb and train the LoRA B matrices only
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_args(cls, args: TrainingArgs) -> "ZoConfig":
        return cls(perturbations=args.zo_perturbations, eps=args.zo_eps, eps_schedule=args.zo_eps_schedule,
                   eps_min_ratio=args.min_lr_ratio, steps=args.steps, parallel=args.zo_parallel,
                   lora_fa=args.zo_lora_fa, seed=args.seed)

    def problem(self) -> str | None:
        """What is wrong with these settings, or None. An app may ask for more directions or settings per forward
        than the CLI's bounds (a typo guard there)."""
        if self.perturbations < 1:
            return f"--zo-perturbations must be >= 1, got {self.perturbations}"
        if not (self.eps > 0 and math.isfinite(self.eps)):
            return f"--zo-eps must be a finite number > 0, got {self.eps}"
        if self.eps_schedule not in SCHEDULES:
            return f"--zo-eps-schedule must be one of {', '.join(SCHEDULES)}, got {self.eps_schedule!r}"
        if self.parallel < 1 or (self.parallel > 1 and self.parallel % 2):
            return f"--zo-parallel must be 1 or even (pairs of + and - perturbations), got {self.parallel}"
        return None

    def eps_at(self, step: int) -> float:
        return learning_rate(step, lr=self.eps, steps=self.steps, warmup_steps=0, schedule=self.eps_schedule,
                             min_lr_ratio=self.eps_min_ratio)


def check_output_directory(path: str | os.PathLike, what: str) -> None:
    """Refuse, before any slow work, an output directory that is a file, lies under a file, or cannot be written."""
    if not str(path):
        raise LarsError(f"{what} is empty; pass a directory path")
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise LarsError(f"{what} {path} is a file, not a directory; choose a directory path")
    existing = target
    while not existing.exists():  # the nearest ancestor that exists is where the directories get created
        existing = existing.parent
    if not existing.is_dir():
        raise LarsError(f"{what} {path} lies under {existing}, which is a file; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise LarsError(f"{what} {path}: directory {existing} is not writable by this user; choose another path or "
                        f"fix its permissions")


# YAML 1.1 (PyYAML) reads a float only with a dot, so `lr: 1e-4` would be the string "1e-4". Like mlx-lm's config
# loader, also resolve YAML 1.2's exponent forms (1e-4, 2E5, 1.5e3, .5e-2) as floats; the other forms already are.
_YAML_EXPONENT_FLOAT = re.compile(r"""^(?:[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+
                                      |[-+]?\.[0-9][0-9_]*[eE][-+]?[0-9]+)$""", re.X)


@functools.cache
def _yaml_loader():
    import yaml

    class ConfigLoader(yaml.SafeLoader):
        """SafeLoader with exponent floats, refusing a key given twice (PyYAML would keep the last silently)."""

        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` may be overridden by design
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    repeated = key in seen
                except TypeError:  # an unhashable key: SafeLoader reports it
                    continue
                if repeated:
                    raise yaml.constructor.ConstructorError(None, None, f"{key!r} is given twice",
                                                            key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep)

    # add_implicit_resolver copies the class's resolver table first, so yaml.SafeLoader itself is left as it is
    ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:float", _YAML_EXPONENT_FLOAT, list("-+0123456789."))
    return ConfigLoader


def _json_object_refusing_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"{key!r} is given twice")
        obj[key] = value
    return obj


def _parse_config(text: str, suffix: str) -> Any:
    if suffix == ".toml":
        import tomllib

        return tomllib.loads(text)
    if suffix == ".json":
        return json.loads(text, object_pairs_hook=_json_object_refusing_repeats)
    import yaml

    data = yaml.load(text, Loader=_yaml_loader())
    return {} if data is None else data  # an empty file (or only comments) sets nothing


def _parse_error_line(e: Exception) -> str:
    problem, mark = getattr(e, "problem", None), getattr(e, "problem_mark", None)
    if problem and mark is not None:  # a yaml.MarkedYAMLError: its str() spans several lines
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    lines = str(e).splitlines()
    return lines[0] if lines else type(e).__name__


CONFIG_SUFFIXES = (".toml", ".yaml", ".yml", ".json")


def load_config_file(path: str) -> dict[str, Any]:
    """Read a TOML, YAML or JSON file of TrainingArgs fields (dashes or underscores), each value checked."""
    p = Path(path)
    suffix = p.suffix.lower()
    if p.is_dir():
        raise LarsError(f"config file {path} is a directory; pass a .toml, .yaml or .json file")
    if not p.is_file():
        raise LarsError(f"config file {path} does not exist; pass an existing .toml, .yaml or .json file")
    if suffix not in CONFIG_SUFFIXES:
        raise LarsError(f"config file {path} must end in .toml, .yaml, .yml or .json")
    kind = suffix[1:].upper().replace("YML", "YAML")
    try:
        text = p.read_bytes().decode("utf-8")
    except OSError as e:
        raise LarsError(f"config file {path} cannot be read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise LarsError(f"config file {path} is not valid {kind}: it is not UTF-8 text") from None
    try:
        data = _parse_config(text, suffix)
    except Exception as e:  # tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError, a repeated key
        raise LarsError(f"config file {path} is not valid {kind}: {_parse_error_line(e)}") from None
    if not isinstance(data, dict):
        example = {".toml": "steps = 100", ".json": '{"steps": 100}'}.get(suffix, "steps: 100")
        raise LarsError(f"config file {path} must hold a table of options, e.g. `{example}`")
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_") if isinstance(key, str) else None
        if name not in _FIELDS:
            hint = " (options go at the top level, not in a table)" if isinstance(value, dict) else ""
            raise LarsError(f"config file {path}: unknown option {_shown(key)}{hint}; see `lars-ort train --help`")
        if name in out:
            raise LarsError(f"config file {path}: {name} is given twice (as dashes and underscores); keep one")
        problem = option_problem(name, value)
        if problem:
            raise LarsError(f"config file {path}: {key} {problem}")
        out[name] = value
    return out
