"""`--memory-budget`: the cheapest memory passes whose predicted peak fits, for `--max-seq-len` tokens.

Candidates are the memory passes' combinations a user would pick, cheapest first. Exact ones come before the
quantized weights (which change the model's loss slightly); among each, the order is by step time relative to
exact LoRA without passes, measured on SmolLM2-135M at 2048 tokens (docs/BENCHMARKS.md). The prediction is
lars_artifacts.memory_model (validated against measured peaks within 15%); a candidate fits when its prediction
is at most (1 - MARGIN) of the budget, so the model's largest measured under-prediction still fits.
The user's LARS setting is kept and priced in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from lars_artifacts import LarsError
from lars_artifacts.memory_model import MemoryModel, estimate

from .stacks import STACKS

# ORT's arena (the runtime's default) peaks up to 14% above the model, which was fitted to a malloc per tensor
# (0.856 of the measured peak for whole attention at 2048 tokens, docs/bench/speed_2048_smollm2.json).
MARGIN = 0.15
# The arena setting a budget is priced on, recorded in the bundle for the runtime to run with (lars_ort's
# --arena-regions auto): with exact-size regions every measured peak lies within MARGIN of its prediction, from
# SmolLM2-135M to the 3B class; with doubling regions a 3B model's full stack at 4096 tokens peaked 25% above it
# (0.800 predicted / measured against 0.869 with exact regions; docs/BENCHMARKS.md, tests/test_memory_model.py).
PRICED_ARENA_REGIONS = "exact"


@dataclass(frozen=True)
class Candidate:
    name: str
    settings: dict  # ExportConfig pass options: lars_export.stacks.STACKS[stack]
    step_time: float  # relative to exact LoRA without passes (measured, see the module docstring)
    stack: str = ""  # its name in lars_export.stacks (and tools/bench_memory.py's mode)


def _candidate(name: str, stack: str, step_time: float) -> Candidate:
    return Candidate(name, dict(STACKS[stack]), step_time, stack)


# Row chunks (4) and 16 loss chunks: stack-rows took 1.12x stack-chunks' step in one run at 2048 tokens
# (docs/bench/memory_2048_rows_smollm2.json); applied to the stacks' factors below.
ROWS_TIME, ROWS_INT8_TIME, ROWS_INT4_TIME = 1.45 * 1.12, 1.46 * 1.12, 1.50 * 1.12
# Causal row chunks: full-int8-causal took 0.93x full-int8's step at 2048 tokens (0.64x at 4096) in one run
# (docs/bench/speed_ab_causal_rows_smollm2.json); applied to the per-head stacks' factors below.
CAUSAL_TIME, CAUSAL_INT8_TIME = 1.45 * 0.93, 1.46 * 0.93
# Step times relative to `ort-lora` at 2048 tokens, SmolLM2-135M (docs/BENCHMARKS.md, "The full memory stack"):
# each pass alone from the per-pass run; combinations from the same run where measured, else the product.
CANDIDATES = [
    _candidate("no memory pass", "ort-lora", 1.00),
    _candidate("chunked loss", "chunked-loss", 1.06),
    _candidate("attention recompute + chunked loss", "recompute-chunked-loss", 1.12),
    _candidate("chunked attention + chunked loss", "chunked-attention", 1.22),
    _candidate("layer recompute + attention in causal row chunks + chunked loss", "stack-causal", CAUSAL_TIME),
    _candidate("layer recompute + chunked attention + chunked loss", "stack-chunks", 1.45),
    _candidate("layer recompute + chunked attention by heads and rows + chunked loss", "stack-rows", ROWS_TIME),
    # quantized frozen weights change the model's loss a little (docs/BENCHMARKS.md): only when nothing exact fits
    _candidate("chunked attention + chunked loss + int8 weights", "chunked-attention-int8", 1.23),
    _candidate("layer recompute + attention in causal row chunks + chunked loss + int8 weights", "full-int8-causal",
               CAUSAL_INT8_TIME),
    _candidate("layer recompute + chunked attention + chunked loss + int8 weights", "full-int8", 1.46),
    _candidate("layer recompute + chunked attention + chunked loss + int4 weights", "full", 1.50),
    _candidate("layer recompute + chunked attention by heads and rows + chunked loss + int8 weights",
               "full-int8-rows", ROWS_INT8_TIME),
    _candidate("layer recompute + chunked attention by heads and rows + chunked loss + int4 weights", "full-rows",
               ROWS_INT4_TIME),
]


def parse_size(text: str) -> int:
    """'2GB', '1.5G', '800MB', '2GiB' -> bytes (binary units: 1 GB = 2**30 bytes, as RSS is reported)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text or "", re.IGNORECASE)
    if not m:
        raise LarsError(f"--memory-budget {text!r} is not a size; write it like 2GB, 1.5G or 800MB")
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[m.group(2).upper()]
    return int(float(m.group(1)) * scale)


def model_for(arch: dict, config, settings: dict | None = None) -> MemoryModel:
    """The memory model of an ExportConfig (with `settings` overriding its pass choices)."""
    s = {k: getattr(config, k) for k in ("recompute_attention", "attention_chunks", "attention_row_chunks",
                                          "loss_chunks", "recompute_layers", "quantize_weights")}
    s.update(settings or {})
    return estimate(arch, config.target_modules(), config.lora_rank, lars_basis=config.lars_basis,
                    lars_rank=config.lars_rank, quantize_block=config.quantize_block_size, **s)


def plan(arch: dict, config) -> tuple[Candidate, list[dict]]:
    """The first candidate that fits config.memory_budget at config.max_seq_len (batch 1), and every candidate's
    prediction; a LarsError that names the closest one if none fits."""
    budget = parse_size(config.memory_budget)
    seq = config.max_seq_len
    if not seq:
        raise LarsError("--memory-budget needs --max-seq-len: the longest sequence the bundle must train on")
    if seq > arch["max_position_embeddings"]:
        raise LarsError(f"--max-seq-len {seq} exceeds the model's context of {arch['max_position_embeddings']} "
                        f"tokens; lower it")
    rows = []
    for c in CANDIDATES:
        model = model_for(arch, config, c.settings)
        rows.append({"name": c.name, "settings": c.settings, "step_time": c.step_time,
                     "predicted_peak_bytes": model.peak_bytes(1, seq),
                     "fits": model.peak_bytes(1, seq) <= (1 - MARGIN) * budget,
                     "max_seq_len": model.max_seq_len((1 - MARGIN) * budget)})
    heads = arch["num_attention_heads"]
    fitting = [replace(c, settings={**c.settings, "attention_chunks": min(c.settings["attention_chunks"], heads)})
               for c, r in zip(CANDIDATES, rows) if r["fits"]]
    if not fitting:
        best = min(rows, key=lambda r: r["predicted_peak_bytes"])
        reach = (f"fits up to {best['max_seq_len']} tokens" if best["max_seq_len"] else
                 "fits no length (the runtime and the weights alone take more)")
        raise LarsError(f"nothing fits {config.memory_budget} at {seq} tokens: the smallest ({best['name']}) is "
                        f"predicted at {best['predicted_peak_bytes'] / 2**30:.2f} GB (+{MARGIN:.0%} margin) and "
                        f"{reach}; raise --memory-budget or lower --max-seq-len")
    return fitting[0], rows


def describe(rows: list[dict], chosen: Candidate, budget: str, seq: int) -> str:
    lines = [f"memory budget {budget} at {seq} tokens (batch 1); predicted peak per choice:"]
    for r in rows:
        mark = "->" if r["name"] == chosen.name else "  "  # noqa: E501
        lines.append(f"  {mark} {r['predicted_peak_bytes'] / 2**30:6.2f} GB  {'fits' if r['fits'] else '    '}  "
                     f"x{r['step_time']:.2f} time  {r['name']}")
    lines.append(f"  (priced on ORT's arena with {PRICED_ARENA_REGIONS} regions, which lars-ort runs this bundle "
                 f"with)")
    return "\n".join(lines)
