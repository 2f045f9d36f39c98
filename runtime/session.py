"""ORT session options shared by both backends: the runtime memory settings (README "Runtime memory settings").

`ort` is either `onnxruntime` (plain) or onnxruntime-training's `_pybind_state`: both expose the same SessionOptions.
"""

from __future__ import annotations

import math
import os

from lars_artifacts import session_settings

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
    if profile_prefix:  # ORT's profiler: a JSON trace per session (tools/profile_step.py reads it)
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    # the arena, buffer reuse, execution order and config entries every runner of a bundle sets
    session_settings.apply(options, ort, memory_arena, memory_reuse, priority_order)
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
