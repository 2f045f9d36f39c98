"""ORT session options shared by both backends: the runtime memory settings (README "Runtime memory settings").

`ort` is either `onnxruntime` (plain) or onnxruntime-training's `_pybind_state`: both expose the same SessionOptions.
"""

from __future__ import annotations

import math
import os

from lars_artifacts import LarsError, session_settings

from .allocator import set_mmap_threshold
from .config import arena_problem

# Run option that hands the arena's free regions back at the end of a run (ORT >= 1.9, CPU and CUDA).
ARENA_SHRINKAGE = "memory.enable_memory_arena_shrinkage"
# arena_regions="exact": ORT's CPU arena registered in its environment (shared by the sessions of this process that
# ask for it) and extended by exactly the size asked for. Its configuration (OrtArenaCfg): no cap, kSameAsRequested,
# ORT's default first region and growth, at most 1 MB of a chunk left unused when a smaller block is carved from it.
EXACT_ARENA = {"max_mem": 0, "arena_extend_strategy": 1, "initial_chunk_size_bytes": -1,
               "max_dead_bytes_per_chunk": 1 << 20, "initial_growth_chunk_size_bytes": -1}
_exact_arena_in: set[int] = set()  # the ORT modules (plain, training build) whose environment holds it


def session_options(ort, threads: int = 0, memory_arena: bool = True, memory_reuse: bool = False,
                    mmap_threshold_mb: float = 1.0, priority_order: bool = True, profile_prefix: str | None = None,
                    arena_regions: str = "doubling"):
    problem = arena_problem(memory_arena, arena_regions)
    if problem:
        raise LarsError(problem)
    if arena_regions not in session_settings.ARENA_REGIONS:  # "auto" is the bundle's: arena_regions_for
        raise LarsError(f"arena_regions={arena_regions!r} must be resolved against the bundle first "
                        f"(lars_ort.session.arena_regions_for)")
    # With the arena off every tensor is a malloc, and with exact regions every region one: the mmap threshold then
    # maps each large one on its own, so it leaves memory when freed. Without it glibc raises its threshold to the
    # largest block freed so far (up to 32 MB), puts smaller ones on its heap and keeps them resident: exact regions
    # held 667 MB between SmolLM2's steps at 1024 tokens, 35 MB with it. (A process-wide glibc setting, so only
    # when asked for.)
    if not memory_arena or arena_regions == "exact":
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
    if arena_regions == "exact":  # with the arena (arena_problem refused it without)
        # A region per size asked for: the 3B full stack at 4096 tokens peaked 470 MB (7%) lower than with doubling
        # regions, the same loss to the last bit (docs/BENCHMARKS.md, "The arena with exact-size regions").
        register_exact_arena(ort)
        options.add_session_config_entry("session.use_env_allocators", "1")
    return options


def arena_regions_for(plan, memory_arena: bool = True, arena_regions: str = "auto") -> str:
    """The arena regions a session runs with: `arena_regions` as given, or for "auto" the ones the bundle's memory
    plan (`plan`, manifest memory) was priced on: exact for a bundle exported with --memory-budget, whose margin
    holds on exact regions at every measured point and not on doubling ones (a 3B model at 4096 tokens peaked 25%
    above the prediction with doubling regions, 15% with exact ones; docs/BENCHMARKS.md), doubling otherwise."""
    if arena_regions != "auto":
        return arena_regions
    return (memory_arena and plan.arena_regions) or "doubling"


def arena_regions_warning(plan, memory_arena: bool, arena_regions: str) -> str | None:
    """One line when the arena regions asked for are not the ones the bundle's memory budget was priced on."""
    priced = plan.arena_regions
    if not priced or not memory_arena or arena_regions in ("auto", priced):
        return None
    return (f"this bundle's memory budget is priced on {priced} arena regions; with {arena_regions} ones a step can "
            f"peak above its prediction by more than the budget's margin (a 3B model at 4096 tokens: 25% with "
            f"doubling regions); leave the arena regions on auto to run with {priced} ones")


def register_exact_arena(ort) -> None:
    """Register the exact-size arena as the CPU allocator of `ort`'s environment, once per process. Process-wide:
    only sessions created with session.use_env_allocators use it; ORT frees it when the process ends."""
    if id(ort) in _exact_arena_in:
        return
    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(info, ort.OrtArenaCfg(EXACT_ARENA))
    _exact_arena_in.add(id(ort))


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
