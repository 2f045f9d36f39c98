"""How the allocator and thread settings change a training step: wall time, CPU, page faults and peak RSS.

    python tools/bench_allocator.py out/bench/bundle-default-r8-q-k-v-o-gate-up-down --seq-len 1024 \\
        --settings malloc,malloc-hugetlb,arena,arena-kept,arena-shared,arena-nospin --json allocator.json

Each setting runs in a fresh process (the glibc tunable must be in the environment before the process starts, and
an arena or an mmap threshold outlives a session): the bundle's training step on plain onnxruntime (OrtEngine,
2 threads by default), one warm-up step, then --steps measured steps on one random batch. Per step: the median wall
time, user and system CPU and minor page faults (getrusage), and the process's VmHWM (peak RSS) and its RSS after
the last step (what it holds between steps).

Settings:
  malloc          ORT's arena off: a malloc per tensor, those of 1 MB and more in their own mapping (the runtime's
                  default before the arena)
  malloc-hugetlb  the same with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (transparent huge pages for malloc's mappings)
  arena           the runtime's default: ORT's CPU arena, no memory patterns, shrunk at the end of every step
  arena-kept      the arena without the shrinkage run option (it keeps its regions between steps)
  arena-shared    --arena-regions exact: an arena registered in ORT's environment (shared by the sessions that opt
                  in), extended by exactly the requested size, at most 1 MB wasted per chunk, shrunk at the end of
                  every step
  arena-nospin    the arena with ORT's intra-op thread spinning off
  malloc-nospin   a malloc per tensor with spinning off
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = {
    "malloc": {"arena": False},
    "malloc-hugetlb": {"arena": False, "env": {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}},
    "arena": {"arena": True},
    "arena-kept": {"arena": True, "shrink": False},
    "arena-shared": {"arena": True, "regions": "exact"},
    "arena-nospin": {"arena": True, "spin": "0"},
    "malloc-nospin": {"arena": False, "spin": "0"},
}


def _rss_mb(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(f"{field}:")) / 1024


def worker(a) -> dict:
    import numpy as np
    import onnxruntime as ort

    import lars_ort.engine_ort as engine_ort
    from lars_artifacts import load_bundle
    from lars_ort.data import Batch
    from lars_artifacts.measure import peak_rss_mb

    s = SETTINGS[a.worker]
    plain = engine_ort.session_options

    def options(*args, **kwargs):
        o = plain(*args, **kwargs)
        if "spin" in s:
            o.add_session_config_entry("session.intra_op.allow_spinning", s["spin"])
        return o

    engine_ort.session_options = options
    engine = engine_ort.OrtEngine(load_bundle(a.bundle, verify=False), load_eval=False, threads=a.threads,
                                  memory_arena=s["arena"], arena_regions=s.get("regions", "doubling"))
    if s.get("shrink") is False:
        engine.run_options = ort.RunOptions()
    rng = np.random.default_rng(0)
    ids = rng.integers(0, engine.vocab_size, size=(1, a.seq_len))
    labels = np.roll(ids, -1, axis=1)
    labels[:, -1] = -100
    batch = Batch(ids, np.ones_like(ids), labels)
    if a.steps:
        engine.forward_backward(batch)
    rows = []
    for _ in range(max(1, a.steps)):  # --steps 0: the first step is the measured one (a large model's step is long)
        r0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        loss = engine.forward_backward(batch)
        r1, w1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        rows.append((w1 - w0, r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime, r1.ru_minflt - r0.ru_minflt))
    wall, user, system, faults = (statistics.median(col) for col in zip(*rows))
    after = _rss_mb()  # before the peak: read the other way round, the RSS can have grown past the peak read
    return {"setting": a.worker, "seq_len": a.seq_len, "threads": a.threads, "wall_s": wall, "user_s": user,
            "system_s": system, "minor_faults": faults, "peak_rss_mb": peak_rss_mb(), "rss_after_mb": after,
            # the memory-mapped weights' pages (reclaimable): peak less this is about the peak's anonymous part
            "rss_file_mb": _rss_mb("RssFile"), "loss": loss}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=2,
                   help="measured steps after one warm-up step (0: measure one step, no warm-up)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print("RESULT " + json.dumps(worker(a)), flush=True)
        return 0
    names = a.settings.split(",")
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        p.error(f"unknown setting {unknown[0]}; choose from {', '.join(SETTINGS)}")
    rows = []
    print("| setting | tokens | wall s | user s | system s | minor faults | peak RSS MB | RSS after MB "
          "| file-backed MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in names:
        env = {**os.environ, **SETTINGS[name].get("env", {})}
        cmd = [sys.executable, __file__, a.bundle, "--worker", name, "--seq-len", str(a.seq_len), "--steps",
               str(a.steps), "--threads", str(a.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"| {name} | {a.seq_len} | failed: {(out.stderr.strip().splitlines() or ['?'])[-1][:200]} |")
            continue
        r = json.loads(line[7:])
        rows.append(r)
        print(f"| {name} | {a.seq_len} | {r['wall_s']:.2f} | {r['user_s']:.2f} | {r['system_s']:.2f} | "
              f"{r['minor_faults']:,.0f} | {r['peak_rss_mb']:,.0f} | {r['rss_after_mb']:,.0f} | "
              f"{r['rss_file_mb']:,.0f} |", flush=True)
        if a.json:  # after every setting: a long run stopped early keeps what it measured
            Path(a.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0 if len(rows) == len(names) else 1


if __name__ == "__main__":
    sys.exit(main())
