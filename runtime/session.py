"""ORT session options shared by both backends: the runtime memory settings (README "Runtime memory settings").

`ort` is either `onnxruntime` (plain) or onnxruntime-training's `_pybind_state`: both expose the same SessionOptions.
"""

from __future__ import annotations

from .allocator import set_mmap_threshold


def session_options(ort, threads: int = 0, memory_arena: bool = False, memory_reuse: bool = False,
                    mmap_threshold_mb: float = 1.0, priority_order: bool = True, profile_prefix: str | None = None):
    if not memory_arena:  # with the arena on, ORT keeps its own blocks and the heap matters less
        set_mmap_threshold(int(mmap_threshold_mb * 2**20))
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    # The CPU arena and memory patterns round and keep allocations for reuse: faster, but they hold memory a
    # device cannot spare (measured: README "Runtime memory settings").
    options.enable_cpu_mem_arena = memory_arena
    options.enable_mem_pattern = memory_arena
    # ORT's planner lets a later tensor of the same size reuse a dead tensor's buffer; the buffer then stays
    # allocated from the first tensor's death until the reuse, which can be the whole forward (a forward
    # temporary reused by a backward tensor). Measured on SmolLM2 at 1024 tokens: off is 0.6 GB lower
    # (README "Runtime memory settings"), and it is what lets LARS' freed inputs actually leave memory.
    options.enable_mem_reuse = memory_reuse
    # Quantized bundles dequantize a frozen matrix once for several readers that run one after the other (the
    # chunked loss' chunks). ORT's QDQ transformers would duplicate that DequantizeLinear per reader, and all
    # copies could run at once; lars' dequantizations are gated on step data, so nothing is constant-folded
    # with them off either (tested: export/passes/quantize_frozen_test.py).
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    # ORT >= 1.20 prepacks MatMul weights into heap copies of the memory-mapped frozen weights: +725 MB after load
    # on an 8-layer SmolLM2-width model (measured). The weights stay where the bundle's file maps them.
    options.add_session_config_entry("session.disable_prepacking", "1")
    if profile_prefix:  # ORT's profiler: a JSON trace per session (tools/profile_step.py reads it)
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    if priority_order:
        # ORT's priority-based order runs Shape/Size nodes as early as possible and forward nodes before
        # backward ones, so tensors the backward only measures (or that LARS projects) die with the forward.
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    return options


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
