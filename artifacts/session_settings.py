"""The ORT session settings a bundle's graphs are built to run under, set by everything that runs them: the runtime
(lars_ort.session, both backends), the exporter's reference runs of ORT's own training artifacts (what the pass tests
compare against), and an app that loads a bundle through ORT's C/C++/C#/Java/Swift API (as the same session options
and config entries). Memory settings of the process (threads, the allocator, profiling) are the runtime's.

`ort` is `onnxruntime` or onnxruntime-training's `_pybind_state`: both expose the same SessionOptions.
"""

from __future__ import annotations

# How ORT's CPU arena grows when no free block fits (lars_ort.session): "doubling", a session's own arena, each new
# region twice the last (few regions, but up to half of the last one's tail unused); "exact", an arena in ORT's
# environment extended by exactly the size asked for (kSameAsRequested). A bundle exported with --memory-budget
# records the one its budget was priced on (manifest memory.arena_regions), which the runtime then runs with.
ARENA_REGIONS = ("doubling", "exact")

# Session config entries (SessionOptions.add_session_config_entry / AddConfigEntry in the C API):
CONFIG_ENTRIES = {
    # Quantized bundles dequantize a frozen matrix once for several readers that run one after the other (the
    # chunked loss' chunks). ORT's QDQ transformers would duplicate that DequantizeLinear per reader, and all
    # copies could run at once; lars' dequantizations are gated on step data, so nothing is constant-folded
    # with them off either (tested: export/passes/quantize_frozen_test.py).
    "session.disable_quant_qdq": "1",
    # ORT >= 1.20 prepacks MatMul weights into heap copies of the memory-mapped frozen weights: +725 MB after load
    # on an 8-layer SmolLM2-width model (measured). The weights stay where the bundle's file maps them.
    "session.disable_prepacking": "1",
}


def apply(options, ort, memory_arena: bool = True, memory_reuse: bool = False, priority_order: bool = True):
    """Set the graph-facing settings on `options` (an `ort.SessionOptions`) and return it."""
    # ORT's CPU arena (a best-fit allocator over regions it mallocs) lets a step reuse the blocks its dead tensors
    # freed; without it each large tensor is a fresh mapping whose every page faults in (SmolLM2 at 1024 tokens:
    # 8.4 s of system time per step against 0.5 s, at the same peak RSS; README "Runtime memory settings").
    # The runtime shrinks it at the end of every step (lars_ort.session.run_options).
    # Memory patterns stay off: they preallocate the planned layout of every tensor (5.0 GB peak against 1.9).
    options.enable_cpu_mem_arena = memory_arena
    options.enable_mem_pattern = False
    # ORT's planner lets a later tensor of the same size reuse a dead tensor's buffer; the buffer then stays
    # allocated from the first tensor's death until the reuse, which can be the whole forward (a forward
    # temporary reused by a backward tensor). Measured on SmolLM2 at 1024 tokens: off is 0.6 GB lower
    # (README "Runtime memory settings"), and it is what lets LARS' freed inputs actually leave memory.
    options.enable_mem_reuse = memory_reuse
    for key, value in CONFIG_ENTRIES.items():
        options.add_session_config_entry(key, value)
    if priority_order:
        # ORT's priority-based order runs Shape/Size nodes as early as possible and forward nodes before
        # backward ones, so tensors the backward only measures (or that LARS projects) die with the forward.
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    return options
