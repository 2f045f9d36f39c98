"""Seeded fuzzing of `lars-ort train` with bad options, config files and damaged bundles.

Every generated case goes through the CLI in-process and must end in exactly one `error:` line that names what is
wrong, exit code 2, no traceback, and nothing written to --out. argparse's own usage errors (`--steps abc`) count:
they print one `lars-ort train: error: ...` line and exit 2.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lars_ort.cli import main
from tiny import TRAIN_TEXT

SEED = 20250101

# Valid flags every case starts from: one short step, so even a check that wrongly passed would end quickly.
BASE = ["--steps", "1", "--batch-size", "1", "--seq-len", "16", "--no-progress", "--threads", "1"]


@dataclass
class Case:
    id: str
    needle: str  # what the error line must name
    flags: list[str] = field(default_factory=list)
    # (file name, content): bytes, or "directory" / "missing" for a directory / no file of that name
    config: tuple[str, bytes | str] | None = None
    damage: tuple | None = None  # bundle damage: (kind, ...)


# --- Command-line values ------------------------------------------------------------------------------------------

INT_MINIMUM = {"steps": 1, "batch-size": 1, "seq-len": 1, "warmup-steps": 0, "eval-every": 0, "eval-batches": 0,
               "save-every": 0, "keep-checkpoints": 1, "seed": 0, "threads": 0}
# Values too large to be meant: the thread count ORT would start, a sequence beyond any context.
INT_HUGE = {"threads": ["99999999999", str(2**64)], "seq-len": ["100000000000000000000"]}
NOT_INTS = ["2.5", "1e3", "abc", "", "nan", "inf", "0x10", " ", "3 steps", "1.0"]
NOT_FLOATS = ["abc", "", "1,5", "0x1p", "--", "e3"]
NON_FINITE = ["nan", "inf", "-inf", "NaN", "Infinity", "1e400", "-1e400"]
FLOAT_OUT_OF_RANGE = {"lr": ["0", "-0.0", "-1e-9", "-3"],
                      "min-lr-ratio": ["-0.01", "1.0001", "2", "1e300"],
                      "mmap-threshold-mb": ["-1", "32.5", "1000", "1e300"]}
CHOICES_BAD = {"schedule": ["cos", "", "COSINE", "step"], "backend": ["gpu", "", "cuda", "ORT"]}


def valid_extras(rng: random.Random, exclude: str) -> list[str]:
    """A few valid flags besides the bad one, so a check does not depend on the other options' defaults."""
    pool = {
        "warmup-steps": lambda: str(rng.randint(0, 5)),
        "schedule": lambda: rng.choice(["cosine", "linear", "constant"]),
        "min-lr-ratio": lambda: f"{rng.random():.3f}",
        "eval-every": lambda: str(rng.randint(0, 3)),
        "save-every": lambda: str(rng.randint(0, 3)),
        "keep-checkpoints": lambda: str(rng.randint(1, 3)),
        "seed": lambda: str(rng.randint(0, 2**40)),
        "mmap-threshold-mb": lambda: rng.choice(["0", "1", "2.5", "32"]),
        "lr": lambda: rng.choice(["1e-4", "0.001", "2e-4", "1"]),
        "eval-batches": lambda: str(rng.randint(0, 2)),
        "backend": lambda: rng.choice(["auto", "ort"]),
        "mask-prompt": None, "memory-arena": None, "memory-reuse": None,
    }
    names = rng.sample(sorted(n for n in pool if n != exclude), rng.randint(0, 3))
    flags = []
    for name in names:
        value = pool[name]
        flags += [rng.choice([f"--{name}", f"--no-{name}"])] if value is None else [f"--{name}={value()}"]
    return flags


def flag_cases(rng: random.Random) -> list[Case]:
    bad: list[tuple[str, str]] = []
    for name, minimum in INT_MINIMUM.items():
        below = [str(minimum - 1), str(minimum - 1 - rng.randint(1, 10**6)), str(-(10**30))]
        bad += [(name, v) for v in rng.sample(below, 2) + rng.sample(NOT_INTS, 3) + INT_HUGE.get(name, [])]
    for name, out_of_range in FLOAT_OUT_OF_RANGE.items():
        bad += [(name, v) for v in rng.sample(NON_FINITE, 3) + rng.sample(out_of_range, 3) + rng.sample(NOT_FLOATS, 2)]
    for name, values in CHOICES_BAD.items():
        bad += [(name, v) for v in values]
    cases = [Case(f"flag-{name}={value!r}", f"--{name}", [*valid_extras(rng, name), f"--{name}={value}"])
             for name, value in bad]
    # flags of the wrong shape: a value for an on/off flag, a flag that does not exist, an empty path
    cases += [Case("flag-progress=yes", "--progress", ["--progress=yes"]),
              Case("flag-resume=1", "--resume", ["--resume=1"]),
              Case("flag-unknown", "--learning-rate", ["--learning-rate", "1e-4"]),
              Case("flag-empty-out", "--out", ["--out="]),
              Case("flag-empty-data", "--data", ["--data="])]
    return cases


# --- Config files -------------------------------------------------------------------------------------------------

FIELDS_BY_KIND = {
    "int": ["steps", "batch_size", "seq-len", "warmup_steps", "eval-every", "eval_batches", "save_every",
            "keep-checkpoints", "seed", "threads"],
    "float": ["lr", "min_lr_ratio", "mmap-threshold-mb"],
    "bool": ["mask_prompt", "progress", "resume", "memory-arena", "memory_reuse"],
    "str": ["data", "eval_data", "out"],
    "choice": ["schedule", "backend"],
}
NAN, INF = float("nan"), float("inf")
WRONG_VALUES = {
    "int": [2.5, "3", True, [1], {"n": 1}, -7, NAN, 1e3],
    "float": ["1e-4", True, [0.1], {"lr": 1}, NAN, INF, -INF, -1, 10**400],
    "bool": ["yes", "false", 1, 0.5, [True]],
    "str": [5, True, ["a.txt"], {"path": "a"}, 1.5],
    "choice": ["cos", 3, ["cosine"], False],
}
UNKNOWN = [("stepz", 3), ("learning_rate", 1e-4), ("lora_rank", 8), ("config", "x.toml"), ("train", {"steps": 3}),
           ("Steps", 3), ("bundle", "out/b")]


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value != value:
        return "nan"
    if isinstance(value, float) and abs(value) == INF:
        return "inf" if value > 0 else "-inf"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"


def yaml_value(value) -> str:
    if isinstance(value, float) and value != value:
        return ".nan"
    if isinstance(value, float) and abs(value) == INF:
        return ".inf" if value > 0 else "-.inf"
    return json.dumps(value)  # JSON's flow syntax is YAML


def config_text(suffix: str, items: list[tuple[str, object]]) -> str:
    if suffix == ".json":
        return "{" + ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in items) + "}"
    if suffix == ".toml":
        return "".join(f"{k if re.fullmatch(r'[A-Za-z0-9_-]+', k) else json.dumps(k)} = {toml_value(v)}\n"
                       for k, v in items)
    return "".join(f"{json.dumps(k)}: {yaml_value(v)}\n" for k, v in items)


def config_cases(rng: random.Random) -> list[Case]:
    cases = []
    for suffix in (".toml", ".yaml", ".yml", ".json"):
        def add(what: str, content: bytes | str, needle: str = "", name: str = f"train{suffix}") -> None:
            cases.append(Case(f"config{suffix}-{what}", needle, config=(name, content)))

        for kind, names in FIELDS_BY_KIND.items():
            for value in rng.sample(WRONG_VALUES[kind], 2):
                name = rng.choice(names)
                good = [("seq_len", 16)] if name not in ("seq_len", "seq-len") else []
                add(f"{name}={value!r}", config_text(suffix, [*good, (name, value)]).encode(), f": {name} must be")
        key, value = rng.choice(UNKNOWN)
        add(f"unknown-{key}", config_text(suffix, [("steps", 1), (key, value)]).encode(), f"unknown option {key!r}")
        add("dashes-and-underscores", config_text(suffix, [("batch-size", 1), ("batch_size", 2)]).encode(),
            "batch_size is given twice")
        add("directory", "directory", "is a directory")
        add("binary-garbage", bytes(rng.getrandbits(8) for _ in range(64)) + b"\xff\xfe")
        valid = config_text(suffix, [("steps", 1), ("lr", 0.001), ("schedule", "linear")])
        add("truncated", valid[: rng.randint(3, len(valid) // 2)].encode() + b"{[\"")
        add("invalid-syntax", {".toml": b"steps = \nlr = 1e-4 = 2\n", ".json": b"{steps: 1,}",
                               ".yaml": b"steps: [1, 2\nlr: {\n", ".yml": b"\tsteps: 1\n  - lr\n"}[suffix])
        if suffix != ".toml":  # a TOML document is always a table
            add("a-list", b"[1, 2]" if suffix == ".json" else b"- steps\n- 3\n")
            add("a-number", b"3")
            add("repeated-key", config_text(suffix, [("lr", 0.001), ("lr", 0.002)]).encode(), "given twice")
        if suffix == ".json":  # an empty TOML or YAML file is an empty, valid table
            add("empty", b"")
    cases.append(Case("config-missing", "does not exist", config=("missing.yaml", "missing")))
    cases.append(Case("config-ini", "must end in", config=("train.ini", b"steps = 3\n")))
    return cases


# --- Bundle damage ------------------------------------------------------------------------------------------------

MANIFEST_TOP = ["source_model", "architecture", "adapter", "io", "tokens", "exporter", "passes", "models",
                "weights", "files", "format", "format_version"]
WRONG_JSON = [None, 0, "x", [], {}, True, 2.5]


def bundle_cases(rng: random.Random) -> list[Case]:
    cases = [Case("manifest-empty", "manifest.json", damage=("manifest-bytes", b"")),
             Case("manifest-null", "manifest.json", damage=("manifest-bytes", b"null")),
             Case("manifest-garbage", "manifest.json",
                  damage=("manifest-bytes", bytes(rng.getrandbits(8) for _ in range(200)))),
             Case("manifest-deleted", "manifest.json", damage=("delete", "manifest.json"))]
    for n in range(4):
        cases.append(Case(f"manifest-truncated-{n}", "manifest.json", damage=("manifest-truncate", rng.random())))
    for n, extra in enumerate([b"}", b"garbage", b"\x00\x01\x02", b'{"a": 1}']):
        cases.append(Case(f"manifest-extra-bytes-{n}", "manifest.json", damage=("manifest-append", extra)))
    for key in rng.sample(MANIFEST_TOP, 6):
        cases.append(Case(f"manifest-missing-{key}", "manifest.json", damage=("manifest-pop", key)))
    for key in rng.sample(MANIFEST_TOP, 6):
        wrong = rng.choice([v for v in WRONG_JSON if type(v) is not {"passes": list, "format": str,
                                                                       "format_version": int}.get(key, dict)])
        cases.append(Case(f"manifest-{key}={wrong!r}", "manifest.json", damage=("manifest-set", key, wrong)))
    for what in ("bytes", "sha256"):
        cases.append(Case(f"manifest-file-entry-without-{what}", "re-export", damage=("entry-pop", what)))
    cases.append(Case("manifest-edited-value", "manifest_sha256", damage=("manifest-edit",)))
    for n in range(3):
        cases.append(Case(f"bundle-file-deleted-{n}", "", damage=("delete-file", rng.random())))
        cases.append(Case(f"bundle-file-truncated-{n}", "", damage=("truncate-file", rng.random(), rng.random())))
    cases.append(Case("bundle-file-overwritten", "sha256", damage=("overwrite-file", rng.random())))
    return cases


def damage_bundle(bundle: Path, damage: tuple) -> str:
    """Apply one damage; returns what the error line must name when the case leaves that open (a file name)."""
    manifest_path = bundle / "manifest.json"
    files = sorted(json.loads(manifest_path.read_text())["files"])
    kind = damage[0]
    if kind == "manifest-bytes":
        manifest_path.write_bytes(damage[1])
    elif kind == "manifest-truncate":
        text = manifest_path.read_bytes()
        manifest_path.write_bytes(text[: int(damage[1] * (len(text) - 2)) + 1])
    elif kind == "manifest-append":
        manifest_path.write_bytes(manifest_path.read_bytes() + damage[1])
    elif kind == "delete":
        (bundle / damage[1]).unlink()
    elif kind in ("manifest-pop", "manifest-set", "entry-pop", "manifest-edit"):
        manifest = json.loads(manifest_path.read_text())
        if kind == "manifest-pop":
            manifest.pop(damage[1])
        elif kind == "manifest-set":
            manifest[damage[1]] = damage[2]
        elif kind == "entry-pop":
            manifest["files"]["checkpoint"].pop(damage[1])
        else:
            manifest["architecture"]["hidden_size"] += 1
        manifest_path.write_text(json.dumps(manifest, indent=2))
    else:
        name = files[int(damage[1] * len(files))]
        path = bundle / name
        if kind == "delete-file":
            path.unlink()
        elif kind == "truncate-file":
            size = path.stat().st_size
            path.write_bytes(path.read_bytes()[: int(damage[2] * size)])
        else:  # same size, other bytes: only the sha256 tells
            path.write_bytes(bytes(b ^ 0x5A for b in path.read_bytes()))
        return name
    return ""


def bad_option_sets(seed: int) -> list[Case]:
    rng = random.Random(seed)
    return flag_cases(rng) + config_cases(rng) + bundle_cases(rng)


CASES = bad_option_sets(SEED)


def test_the_generator_makes_enough_cases():
    assert len(CASES) >= 100 and len({c.id for c in CASES}) == len(CASES)
    assert bad_option_sets(SEED) == CASES  # seeded: a failure reproduces


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_option_set_is_one_error_line(case, tiny_bundles, tmp_path, capsys):
    bundle, out = tiny_bundles["llama"], tmp_path / "run"
    needle = case.needle
    argv = ["--data", str(TRAIN_TEXT), "--out", str(out), *BASE]
    if case.config is not None:
        name, content = case.config
        config = tmp_path / name
        if content == "directory":
            config.mkdir()
        elif content != "missing":
            config.write_bytes(content)
        argv += ["--config", str(config)]
        needle = needle or str(config)  # every config error names its file: checked below as well
    if case.damage is not None:
        bundle = tmp_path / "bundle"
        shutil.copytree(tiny_bundles["llama"], bundle)
        needle = damage_bundle(bundle, case.damage) or needle
    argv = ["train", str(bundle), *argv, *case.flags]

    try:
        code = main(argv)
        from_argparse = False
    except SystemExit as e:  # argparse's own usage errors
        code, from_argparse = e.code, True
    err = capsys.readouterr().err

    assert code == 2, err
    assert "Traceback" not in err, err
    error_lines = [line for line in err.splitlines() if "error:" in line]
    assert len(error_lines) == 1, err
    line = error_lines[0]
    assert re.match(r"lars-ort( train)?: error: " if from_argparse else "error: ", line), line
    assert needle in line, (needle, line)
    if case.config is not None:
        assert str(tmp_path / case.config[0]) in line, line
    assert not out.exists(), sorted(out.rglob("*"))
