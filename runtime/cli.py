"""`lars-ort`: train, eval and export-adapter, on the device, without torch.

    lars-ort train BUNDLE --data FILE --out RUN [--config FILE] [flags]
    lars-ort eval BUNDLE --data FILE [--run RUN]
    lars-ort export-adapter RUN --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import MISSING, fields

from lars_artifacts import LarsError
from lars_artifacts.errors import cli_exit_code

from .config import BACKENDS, TrainingArgs, check_output_directory, flag, load_config_file, option_problem


def _add_training_flags(parser: argparse.ArgumentParser) -> None:
    """Flags generated from TrainingArgs; their default is None so a config file value is not overridden."""
    helps = TrainingArgs.help()
    for f in fields(TrainingArgs):
        option = flag(f.name)
        default = f.default if f.default is not MISSING else None
        text = f"{helps[f.name]} (default: {default})"
        if isinstance(default, bool):
            parser.add_argument(option, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            parser.add_argument(option, dest=f.name, type=kind, default=None, choices=f.metadata.get("choices"),
                                help=text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lars-ort", description="Fine-tune a lars bundle on this device.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="fine-tune the bundle's LoRA adapters")
    train.add_argument("bundle", help="bundle directory written by lars-export")
    train.add_argument("--config", help="TOML or YAML file of options; flags override it")
    _add_training_flags(train)

    ev = sub.add_parser("eval", help="loss and perplexity on a data file")
    ev.add_argument("bundle", help="bundle directory written by lars-export")
    ev.add_argument("--data", required=True, help="evaluation data (.txt or .jsonl)")
    ev.add_argument("--run", help="a training run: evaluate its latest adapters instead of the initial ones")
    ev.add_argument("--batch-size", type=int, default=4)
    ev.add_argument("--seq-len", type=int, default=256)
    ev.add_argument("--threads", type=int, default=0)
    ev.add_argument("--backend", default="auto", choices=BACKENDS,
                    help="ort (plain onnxruntime; auto picks it) or ort-training (onnxruntime-training 1.19.2)")

    ex = sub.add_parser("export-adapter", help="write a run's adapters as a PEFT LoRA adapter")
    ex.add_argument("run", help="run directory of `lars-ort train`")
    ex.add_argument("--out", required=True, help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    ex.add_argument("--bundle", help="the run's bundle, if it moved since training")
    return parser


def training_args(ns: argparse.Namespace) -> TrainingArgs:
    values = load_config_file(ns.config) if ns.config else {}
    for f in fields(TrainingArgs):
        given = getattr(ns, f.name)
        if given is not None:
            values[f.name] = given
    return TrainingArgs(**values)  # load_config_file admits known fields only; train() validates every value


def check_flags(ns: argparse.Namespace, names: tuple[str, ...]) -> None:
    """Range-check flags that share a TrainingArgs field's meaning (argparse has checked their types)."""
    for name in names:
        problem = option_problem(name, getattr(ns, name))
        if problem:
            raise LarsError(f"{flag(name)} {problem}")


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    # Ctrl-C outside the training loop's own handling (start-up, eval, export) half-wrote nothing: the run directory
    # only changes by atomic renames.
    return cli_exit_code(lambda: _command(ns), "interrupted; the run directory is consistent: continue with --resume",
                         rerun="run again (train --resume continues from the last checkpoint)")


def _command(ns: argparse.Namespace) -> int | None:
    """Run the parsed command; its exit code if it is not 0."""
    from . import commands, loop

    if ns.command == "train":
        args = training_args(ns)
        summary = loop.train(ns.bundle, args)
        losses = summary["losses"]
        if losses:
            print(f"trained steps {summary['start_step']}..{summary['step']}: loss {losses[0]:.4f} -> "
                  f"{losses[-1]:.4f}", file=sys.stderr)
        if "final_eval" in summary:
            print(f"eval loss {summary['final_eval']['eval_loss']:.4f}", file=sys.stderr)
        if summary.get("skipped_steps"):
            print(f"skipped {summary['skipped_steps']} steps with a NaN/inf loss or gradient", file=sys.stderr)
        if "interrupted" in summary:
            where = (f"checkpoint: {summary['checkpoint']}" if "checkpoint" in summary
                     else "no checkpoint yet: --resume starts again from step 0")
            print(f"stopped by {summary['interrupted']} after step {summary['step']}; {where}; continue with "
                  f"--resume", file=sys.stderr)
            return summary["exit_code"]
        print(f"checkpoint: {summary['checkpoint']}", file=sys.stderr)
    elif ns.command == "eval":
        check_flags(ns, ("batch_size", "seq_len", "threads"))
        result = commands.evaluate_file(ns.bundle, ns.data, ns.run, ns.batch_size, ns.seq_len,
                                         threads=ns.threads, backend=ns.backend)
        print(json.dumps(result))
    elif ns.command == "export-adapter":
        check_output_directory(ns.out, "--out")  # before the bundle's files are hashed
        out = commands.export_run_adapter(ns.run, ns.out, ns.bundle)
        print(f"PEFT adapter written to {out}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
