"""ORT session options shared by both backends: the runtime memory settings (README "Runtime memory settings").

`ort` is either `onnxruntime` (plain) or onnxruntime-training's `_pybind_state`: both expose the same SessionOptions.
"""

from __future__ import annotations

import math
import os

from .allocator import set_mmap_threshold

# Run option that hands the arena's free regions back at the end of a run (ORT >= 1.9, CPU and CUDA).
ARENA_SHRINKAGE = "memory.enable_memory_arena_shrinkage"


def session_options(ort, threads: int = 0, memory_arena: bool = True, memory_reuse: bool = False,
                    mmap_threshold_mb: float = 1.0, priority_order: bool = True, profile_prefix: str | None = None):
    # With the arena off every tensor is a malloc: the mmap threshold then maps each large one on its own, so it
    # leaves memory when freed (a process-wide glibc setting, so only when asked for).
    if not memory_arena:
        set_mmap_threshold(int(mmap_threshold_mb * 2**20))
    options = ort.SessionOptions()
    threads = threads or available_cores()
    if threads:
        options.intra_op_num_threads = threads
    # ORT's CPU arena (a best-fit allocator over regions it mallocs) lets a step reuse the blocks its dead tensors
    # freed; without it each large tensor is a fresh mapping whose every page faults in (SmolLM2 at 1024 tokens:
    # 8.4 s of system time per step against 0.5 s, at the same peak RSS; README "Runtime memory settings").
    # run_options() shrinks it at the end of every step, so between steps the process holds what it held before.
    # Memory patterns stay off: they preallocate the planned layout of every tensor (5.0 GB peak against 1.9).
    options.enable_cpu_mem_arena = memory_arena
    options.enable_mem_pattern = False
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


def run_options(ort, memory_arena: bool = True):
    """RunOptions of every step: the arena shrinks back to its start-of-run regions when the run ends."""
    options = ort.RunOptions()
    if memory_arena:
        options.add_run_config_entry(ARENA_SHRINKAGE, "cpu:0")
    return options


def available_cores() -> int:
    """The cores this process may run on when it is confined to fewer than the machine has (CPU affinity, a cgroup
    v2 quota: containers, taskset, Android's big/little masks), else 0 (ORT's default: one thread per physical
    core). ORT's default counts the machine's cores, so a confined process would start more threads than it can
    run, and its spinning threads steal time from the one doing the work."""
    total = os.cpu_count() or 0
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else total
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            allowed = min(allowed, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return allowed if 0 < allowed < total else 0


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
