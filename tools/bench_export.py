"""Export time and peak memory by model size: `lars-export` of each model in its own process, phase by phase.

    python tools/bench_export.py --models smollm2,qwen2.5-0.5b,qwen2.5-1.5b --json export.json --plot export.png

Models (or a local HF model folder): `smollm2` is the embedded SmolLM2-135M-Instruct (its GGUF, as `lars-export`
with no model loads it); the others are built from the named public configs with random weights (no hub here; the
norms are perturbed so that no two initializers are equal, as real weights are not) and SmolLM2's tokenizer, saved
once under --cache:
  qwen2.5-0.5b  Qwen2.5-0.5B's config (hidden 896, MLP 4864, 24 layers, vocab 151,936, tied)
  qwen2.5-1.5b  Qwen2.5-1.5B's (hidden 1536, MLP 8960, 28 layers, tied)
  llama-3.2-1b  Llama-3.2-1B's (hidden 2048, MLP 8192, 16 layers, vocab 128,256, tied)
  llama-3.2-3b  Llama-3.2-3B's (hidden 3072, MLP 8192, 28 layers, tied)
  gemma-3-1b    Gemma 3 1B's (hidden 1152, MLP 6912, 26 layers, 5 of 6 with a 512-token window, vocab 262,144, tied)
NAME.gguf (e.g. qwen2.5-0.5b.gguf) writes that folder as a GGUF first (tools/write_gguf.py, --gguf-type, default
q8_0, once under --cache) and exports the .gguf, through transformers' GGUF reader as a user's GGUF would go; a path
to an existing .gguf file is exported as it is. Each export runs with the exporter's defaults (extra flags:
--export-args). The table gives each phase's time, the exporter's peak RSS and that of its onnxruntime-training child
(the gradient builder), as the exporter prints them.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

_QWEN25 = dict(num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768,
               rope_theta=1e6)
_LLAMA32 = dict(num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, max_position_embeddings=131072,
                rope_theta=5e5, rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
_GEMMA3_1B = dict(hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=256, vocab_size=262144, max_position_embeddings=32768,
                  sliding_window=512, query_pre_attn_scalar=256, rope_theta=1e6, tie_word_embeddings=True,
                  layer_types=[("full_attention" if (i + 1) % 6 == 0 else "sliding_attention") for i in range(26)])
CONFIGS = {
    "qwen2.5-0.5b": ("qwen2", dict(_QWEN25, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                   num_attention_heads=14)),
    "qwen2.5-1.5b": ("qwen2", dict(_QWEN25, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                   num_attention_heads=12)),
    "llama-3.2-1b": ("llama", dict(_LLAMA32, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                   num_attention_heads=32, head_dim=64)),
    "llama-3.2-3b": ("llama", dict(_LLAMA32, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                                   num_attention_heads=24, head_dim=128)),
    "gemma-3-1b": ("gemma3_text", _GEMMA3_1B),
}

PHASE = re.compile(r"^\[(\d+)/(\d+)\] (.*) \.\.\.$")
DONE = re.compile(r"done in ([\d.]+) s \(peak RSS ([\d,]+) MB(?:; gradient builder's process ([\d,]+) MB)?\)")


def build_model(name: str, cache: Path) -> Path:
    """A float32 HF folder of the named config with random weights (built once)."""
    folder = cache / name
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    from lars_export import load

    family, settings = CONFIGS[name]
    config_cls, model_cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM),
                             "gemma3_text": (Gemma3TextConfig, Gemma3ForCausalLM)}[family]
    torch.manual_seed(0)
    model = model_cls(config_cls(**settings, bos_token_id=1, eos_token_id=2)).eval()
    with torch.no_grad():  # random-init norms are all ones: identical initializers get merged by the ONNX exporter
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    load.hf_tokenizer(load.resolve(None)).save_pretrained(folder)
    return folder


def parse_phases(stderr: str) -> list[dict]:
    phases, current = [], None
    for line in stderr.splitlines():
        line = line.strip()
        if m := PHASE.match(line):
            current = {"phase": m.group(3)}
        elif (m := DONE.search(line)) and current is not None:
            current.update(seconds=float(m.group(1)), peak_rss_mb=float(m.group(2).replace(",", "")),
                           child_peak_rss_mb=float(m.group(3).replace(",", "")) if m.group(3) else None)
            phases.append(current)
            current = None
    return phases


def build_gguf(name: str, cache: Path, qtype: str) -> Path:
    """The named config's random-weight folder written as a GGUF of `qtype` blocks (built once)."""
    path = cache / f"{name}.{qtype}.gguf"
    if not path.is_file():
        import write_gguf

        write_gguf.write(build_model(name, cache), path.with_suffix(".partial"), qtype).rename(path)
    return path


def measure(name: str, a) -> dict:
    if name == "smollm2":
        model = None
    elif Path(name).is_dir() or Path(name).is_file():  # a local HF folder or .gguf file
        model = name
    elif name.endswith(".gguf"):
        model = str(build_gguf(name.removesuffix(".gguf"), Path(a.cache), a.gguf_type))
    else:
        model = str(build_model(name, Path(a.cache)))
    out = Path(a.cache) / f"bundle-{Path(name).name}"
    cmd = [str(Path(sys.executable).parent / "lars-export"), *([model] if model else []), "--out", str(out),
           "--force", *shlex.split(a.export_args)]
    print(f"{name}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
    seconds = time.monotonic() - start
    row = {"model": Path(name).name, "exit_code": proc.returncode, "seconds": round(seconds, 1),
           "phases": parse_phases(proc.stderr)}
    if proc.returncode != 0:
        row["error"] = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
        return row
    manifest = json.loads((out / "manifest.json").read_text())
    frozen = manifest["adapter"]["frozen_parameters"]
    row.update(parameters=frozen + manifest["adapter"]["trainable_parameters"], float32_mb=frozen * 4 / 2**20,
               peak_rss_mb=max(p["peak_rss_mb"] for p in row["phases"]),
               child_peak_rss_mb=max((p["child_peak_rss_mb"] or 0) for p in row["phases"]))
    if not a.keep_bundles:
        subprocess.run(["rm", "-rf", str(out)], check=False)
    return row


def _short(phase: str) -> str:
    for key, label in (("loading", "load"), ("LARS basis", "basis"), ("exporting", "onnx"), ("checking", "check"),
                       ("generating", "artifacts"), ("lowering", "lower"), ("writing", "write")):
        if phase.startswith(key):
            return label
    return phase[:10]


def table(rows: list[dict]) -> str:
    labels = ["load", "basis", "onnx", "check", "artifacts", "lower", "write"]
    head = ["model", "parameters", "float32", *[f"{x} s" for x in labels], "total", "exporter peak", "child peak"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r["exit_code"] != 0:
            lines.append(f"| {r['model']} | failed: {r.get('error', '')} |")
            continue
        times = {_short(p["phase"]): p["seconds"] for p in r["phases"]}
        lines.append("| " + " | ".join([r["model"], f"{r['parameters'] / 1e6:,.0f}M", f"{r['float32_mb']:,.0f} MB",
                                        *[f"{times.get(x, 0):.1f}" for x in labels], f"{r['seconds']:.0f} s",
                                        f"{r['peak_rss_mb']:,.0f} MB", f"{r['child_peak_rss_mb']:,.0f} MB"]) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["exit_code"] == 0]
    fig, ax = plt.subplots(figsize=(7, 4))
    x = range(len(rows))
    ax.bar([i - 0.27 for i in x], [r["float32_mb"] / 1024 for r in rows], 0.27, label="float32 weights")
    ax.bar(list(x), [r["peak_rss_mb"] / 1024 for r in rows], 0.27, label="exporter peak RSS")
    ax.bar([i + 0.27 for i in x], [r["child_peak_rss_mb"] / 1024 for r in rows], 0.27,
           label="gradient builder's peak RSS")
    ax.set_xticks(list(x), [r["model"] for r in rows])
    ax.set_ylabel("GiB")
    ax.set_title("lars-export peak memory by model size")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2,qwen2.5-0.5b",
                   help=f"smollm2, any of {', '.join(CONFIGS)} (or NAME.gguf), a local HF model folder or .gguf")
    p.add_argument("--gguf-type", default="q8_0", help="block type of NAME.gguf models (tools/write_gguf.py --type)")
    p.add_argument("--export-args", default="", help="extra lars-export flags, e.g. '--quantize-weights int8'")
    p.add_argument("--cache", default=str(REPO / "out" / "bench-export"), help="built model folders and bundles")
    p.add_argument("--keep-bundles", action="store_true")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per export")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--plot", help="write a PNG here")
    a = p.parse_args(argv)
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    unknown = [m for m in models if m != "smollm2" and m.removesuffix(".gguf") not in CONFIGS
               and not Path(m).is_dir() and not (m.endswith(".gguf") and Path(m).is_file())]
    if unknown:
        p.error(f"unknown model {unknown[0]!r}; use smollm2, one of {', '.join(CONFIGS)} (NAME or NAME.gguf), "
                f"a model folder or a .gguf file")
    Path(a.cache).mkdir(parents=True, exist_ok=True)
    rows = []
    for name in models:
        rows.append(measure(name, a))
        print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    print(table(rows))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2) + "\n")
    if a.plot:
        plot(rows, a.plot)
    return 0 if all(r["exit_code"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
