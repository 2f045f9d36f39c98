"""The memory passes' combinations by name: what `--memory-budget` chooses among (budget.CANDIDATES) and what the
benchmarks measure (tools/bench_memory.py's bundle modes of the same names), one table for both.

Each stack sets every pass option of ExportConfig, so its bundle does not depend on the exporter's defaults; LARS
is not a pass option here (the budget keeps the user's setting, the benchmarks turn it off for these stacks).
"""

from __future__ import annotations

PER_HEAD = 1 << 16  # --attention-chunks at or above the head count: one head at a time (the pass takes the head count)
PASS_OPTIONS = ("recompute_attention", "attention_chunks", "attention_row_chunks", "loss_chunks", "recompute_layers",
                "quantize_weights")

_NONE = dict(recompute_attention=False, attention_chunks=0, attention_row_chunks=0, loss_chunks=0,
             recompute_layers=False, quantize_weights="none")
# Chunked attention, one head at a time (it recomputes the probabilities), with the loss in 8 chunks.
_CHUNKED = dict(_NONE, recompute_attention=True, attention_chunks=PER_HEAD, loss_chunks=8)
# Layer recompute with attention recomputed whole (the first stack measured).
_STACK = dict(_NONE, recompute_attention=True, loss_chunks=8, recompute_layers=True)
# For long sequences: each head's query rows in 4 chunks too, and the loss in 16.
_ROWS = dict(_CHUNKED, recompute_layers=True, attention_row_chunks=4, loss_chunks=16)
# Layer recompute with all heads' query rows in 16 causal chunks (each reads only the keys up to its last row) and
# the loss in 16: the fastest stack at long lengths (docs/BENCHMARKS.md, "Step time, third round").
_CAUSAL = dict(_NONE, recompute_attention=True, recompute_layers=True, attention_row_chunks=16, loss_chunks=16)

STACKS: dict[str, dict] = {
    "ort-lora": _NONE,
    "chunked-loss": dict(_NONE, loss_chunks=8),
    "recompute": dict(_NONE, recompute_attention=True),
    "recompute-chunked-loss": dict(_NONE, recompute_attention=True, loss_chunks=8),
    "attn-chunks": dict(_NONE, attention_chunks=PER_HEAD),
    "chunked-attention": _CHUNKED,
    "int8": dict(_NONE, quantize_weights="int8"),
    "int4": dict(_NONE, quantize_weights="int4"),
    "chunked-attention-int8": dict(_CHUNKED, quantize_weights="int8"),
    "stack": _STACK,
    "stack-int8": dict(_STACK, quantize_weights="int8"),
    "stack-int4": dict(_STACK, quantize_weights="int4"),
    "stack-chunks": dict(_CHUNKED, recompute_layers=True),
    "full-int8": dict(_CHUNKED, recompute_layers=True, quantize_weights="int8"),
    "full": dict(_CHUNKED, recompute_layers=True, quantize_weights="int4"),
    "stack-rows": _ROWS,
    "full-int8-rows": dict(_ROWS, quantize_weights="int8"),
    "full-rows": dict(_ROWS, quantize_weights="int4"),
    "stack-causal": _CAUSAL,
    "full-int8-causal": dict(_CAUSAL, quantize_weights="int8"),
}
