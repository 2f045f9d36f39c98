"""The process allocator's side of memory use: glibc's heap keeps what ORT frees.

With ORT's arena off, every tensor is a malloc/free. glibc serves allocations below its mmap threshold (dynamic, up
to 32 MB) from its heaps, and a freed chunk stays in the process, reusable only by an allocation it fits: a training
step frees and allocates tensors of hundreds of sizes with crossing lifetimes, so the heaps fragment and the peak RSS
grows far past what is alive (measured on SmolLM2 at 1024 tokens with every recompute pass: 2.4–3.1 GB resident for
under 1 GB alive). Lowering the threshold gives each tensor of 1 MB or more its own mapping, returned to the OS on
free, for some page-fault time (README "Runtime memory settings").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3  # glibc malloc.h


def set_mmap_threshold(nbytes: int) -> bool:
    """Allocations of at least `nbytes` get their own mapping (glibc only); False where that cannot be set."""
    if not sys.platform.startswith("linux") or nbytes <= 0:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, int(nbytes)) == 1
