"""What is alive at the peak of one training step, by allocation size: the step runs under strace, every large
allocation is an mmap of its own (ORT's arena off and the runtime's 1 MB mmap threshold: `--no-memory-arena`), so
the set alive at the highest point is exact, and tensor sizes name the tensors (e.g. at 4096 tokens [T, T] float32
is 64 MB, [T, hidden] 9 MB).

    python tools/alloc_trace.py BUNDLE --seq-len 4096

Prints the mapped bytes at the step's start and peak, the allocations made during the step and alive at the peak
grouped by size, and the order of allocations (+MB) and frees (-MB) just before the peak. Needs strace (Linux).
This is how the chunked attention's early dP (every head's dO·Vᵀ computed at once) was found.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MARK = "lars-alloc-trace-step-start"
_MMAP = re.compile(r"mmap\(NULL, (\d+), PROT_READ\|PROT_WRITE, MAP_PRIVATE\|MAP_ANONYMOUS[^)]*\) = (0x[0-9a-f]+)")
_MUNMAP = re.compile(r"munmap\((0x[0-9a-f]+), (\d+)\)")
_STEP = """
import sys, numpy as np
from lars_ort import Trainer
t = Trainer(sys.argv[1], load_eval=False, threads=2, verify=False, memory_arena=False)  # a mapping per tensor
batch = t.batch(np.random.default_rng(0).integers(1, t.bundle.manifest.vocab_size, size=(1, int(sys.argv[2]))))
open(sys.argv[3]).close()  # the marker: an openat of this path in the trace
t.step(batch, lr=1e-4)
"""


def analyse(lines: list[str], large: int = 1 << 20, window: int = 400) -> dict:
    start = max((i for i, line in enumerate(lines) if MARK in line), default=0)
    alive: dict[str, tuple[int, int]] = {}
    total = peak = peak_line = base = 0
    peak_alive: dict = {}
    for i, line in enumerate(lines):
        if i == start:
            base = total
        m = _MMAP.search(line)
        if m:
            size = int(m.group(1))
            if size >= large:
                alive[m.group(2)] = (size, i)
                total += size
                if i > start and total > peak:
                    peak, peak_line, peak_alive = total, i, dict(alive)
            continue
        m = _MUNMAP.search(line)
        if m and m.group(1) in alive:
            total -= alive.pop(m.group(1))[0]
    during = collections.Counter(size for size, i in peak_alive.values() if i > start)
    order = []
    for line in lines[max(start, peak_line - window):peak_line + 1]:
        m = _MMAP.search(line)
        if m and int(m.group(1)) >= large:
            order.append(f"+{int(m.group(1)) / 2**20:.0f}")
        elif (m := _MUNMAP.search(line)) and int(m.group(2)) >= large:
            order.append(f"-{int(m.group(2)) / 2**20:.0f}")
    return {"start_mb": base / 2**20, "peak_mb": peak / 2**20, "alive_by_size": during, "before_peak": order}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", nargs="?", help="the bundle whose step is traced (not with --trace)")
    p.add_argument("--seq-len", type=int, default=2048)
    default_rt = REPO / ".venv-runtime" / "bin" / "python"
    p.add_argument("--runtime-python", default=str(default_rt) if default_rt.exists() else sys.executable)
    p.add_argument("--trace", help="analyse this saved `strace -f -e trace=mmap,munmap,openat` log instead")
    p.add_argument("--json", help="write the analysis here")
    a = p.parse_args(argv)
    if a.trace:
        result = analyse(Path(a.trace).read_text().splitlines())
    else:
        if not a.bundle:
            p.error("pass a bundle to trace, or --trace LOG")
        if not shutil.which("strace"):
            p.error("strace is not installed; install it (apt-get install strace) or run on a machine that has it")
        with tempfile.TemporaryDirectory() as tmp:
            marker, trace = Path(tmp) / MARK, Path(tmp) / "trace.txt"
            marker.touch()
            subprocess.run(["strace", "-f", "-e", "trace=mmap,munmap,openat", "-o", str(trace), a.runtime_python,
                            "-c", _STEP, a.bundle, str(a.seq_len), str(marker)], check=True)
            result = analyse(trace.read_text().splitlines())
    if a.json:
        Path(a.json).write_text(json.dumps({**result, "alive_by_size": {str(k): v for k, v in
                                                                         result["alive_by_size"].items()}}) + "\n")
    print(f"mapped at the step's start {result['start_mb']:,.0f} MB, at its peak {result['peak_mb']:,.0f} MB "
          f"(allocations of 1 MB and more)\nallocated during the step and alive at the peak:")
    for size, n in sorted(result["alive_by_size"].items(), key=lambda x: -x[0] * x[1])[:20]:
        print(f"  {size / 2**20:9.2f} MB x {n:4d} = {size * n / 2**20:8.1f} MB")
    print("just before the peak (+allocated, -freed, MB):\n  " + " ".join(result["before_peak"][-200:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
