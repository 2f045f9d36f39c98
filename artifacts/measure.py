"""How both halves measure themselves: a process's peak and current resident memory, and elapsed time. Standard
library only (the exporter's phases, the runtime's progress bar and the benchmarks report the same figures)."""

from __future__ import annotations

import sys
import time


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (the OS's own high-water mark); 0.0 where unknown.

    On Linux this is VmHWM of this process's address space: getrusage's ru_maxrss survives exec, so a process
    started by a large parent would report the parent's peak. On Windows it is the peak working set.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    if sys.platform == "win32":
        return _windows_peak_working_set() / 2**20
    try:
        import resource  # POSIX only: imported here so the module loads on Windows
    except ImportError:
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


RSS_FIELDS = ("VmRSS", "RssAnon", "RssFile")


def rss_split_mb(pid: int | str = "self") -> tuple[float, float, float] | None:
    """(resident, anonymous, file-backed) MiB of a process now, from one read of /proc/PID/status; None off Linux
    or once the process is gone. Anonymous is what the process allocated (heap, arena, session); file-backed is
    mapped files (the weights, libraries), pages the kernel can drop and read again."""
    try:
        with open(f"/proc/{pid}/status") as f:
            kb = {k: float(v.split()[0]) for k, _, v in (line.partition(":") for line in f) if k in RSS_FIELDS}
    except OSError:
        return None
    return tuple(kb[k] / 1024 for k in RSS_FIELDS) if len(kb) == len(RSS_FIELDS) else None


def _windows_peak_working_set() -> int:
    """PeakWorkingSetSize of this process in bytes (GetProcessMemoryInfo, via ctypes: psutil is no dependency)."""
    import ctypes
    from ctypes import wintypes

    class ProcessMemoryCounters(ctypes.Structure):  # PROCESS_MEMORY_COUNTERS, psapi.h
        _fields_ = [("cb", wintypes.DWORD), ("PageFaultCount", wintypes.DWORD),
                    ("PeakWorkingSetSize", ctypes.c_size_t), ("WorkingSetSize", ctypes.c_size_t),
                    ("QuotaPeakPagedPoolUsage", ctypes.c_size_t), ("QuotaPagedPoolUsage", ctypes.c_size_t),
                    ("QuotaPeakNonPagedPoolUsage", ctypes.c_size_t), ("QuotaNonPagedPoolUsage", ctypes.c_size_t),
                    ("PagefileUsage", ctypes.c_size_t), ("PeakPagefileUsage", ctypes.c_size_t)]

    try:
        kernel32 = ctypes.WinDLL("kernel32")
        get_info = kernel32.K32GetProcessMemoryInfo  # kernel32's export of psapi's GetProcessMemoryInfo (Windows 7+)
    except (OSError, AttributeError):
        return 0
    kernel32.GetCurrentProcess.restype = wintypes.HANDLE
    get_info.argtypes = [wintypes.HANDLE, ctypes.POINTER(ProcessMemoryCounters), wintypes.DWORD]
    get_info.restype = wintypes.BOOL
    counters = ProcessMemoryCounters()
    counters.cb = ctypes.sizeof(counters)
    if not get_info(kernel32.GetCurrentProcess(), ctypes.byref(counters), counters.cb):
        return 0
    return counters.PeakWorkingSetSize


class Stopwatch:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.start
