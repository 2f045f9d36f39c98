"""`lars-export [MODEL] --out DIR`: the options come from ExportConfig."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import MISSING, fields

from lars_artifacts.errors import cli_exit_code

from .config import ExportConfig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lars-export",
        description="Export a Hugging Face causal LM (Llama / Qwen2 family) with LoRA adapters to an ONNX Runtime "
                    "training bundle that `lars-ort train` fine-tunes on device.")
    helps = ExportConfig.field_help()
    for f in fields(ExportConfig):
        default = f.default if f.default is not MISSING else None
        if f.name == "model":
            parser.add_argument("model", nargs="?", default=None, help=helps[f.name])
        elif f.type == "bool" or isinstance(default, bool):
            # A flag that is on by default needs its --no- form to turn it off.
            action = argparse.BooleanOptionalAction if default else "store_true"
            parser.add_argument(f"--{f.name.replace('_', '-')}", action=action, default=bool(default),
                                help=helps[f.name])
        elif isinstance(default, tuple):
            parser.add_argument(f"--{f.name.replace('_', '-')}", default=",".join(default),
                                help=f"{helps[f.name]} (default: {','.join(default)})")
        else:
            kind = {"int": int, "float": float}.get(str(f.type).removesuffix(" | None"), str)
            parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=default,
                                choices=f.metadata.get("choices"), help=f"{helps[f.name]} (default: {default})")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each step")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    values = {f.name: getattr(args, f.name) for f in fields(ExportConfig)}
    values["targets"] = tuple(t.strip() for t in values["targets"].split(",") if t.strip())
    try:
        from . import pipeline
    except ImportError as e:
        print(f"error: lars-export needs the export extra ({e.name} is missing); "
              f"install it with `pip install 'lars[export]'`", file=sys.stderr)
        return 2
    def export() -> None:
        pipeline.run(ExportConfig(**values))

    # (a full disk is the likely OSError: an export stages about three times the model's float32 size)
    return cli_exit_code(export, "error: interrupted; no bundle was written", rerun="export again")


if __name__ == "__main__":
    sys.exit(main())
