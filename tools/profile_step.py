"""Where a training step's time goes: per-op-type kernel time, forward vs backward, CPU and page faults.

    python tools/profile_step.py out/bench/bundle-default-r8-q-k-v-o-gate-up-down --seq-len 1024 --steps 2 \\
        --json profile.json

Runs the bundle's training step on the default backend (plain onnxruntime, lars_ort.engine_ort) with ORT's profiler
on: one warm-up step, then --steps measured steps on a random batch. Prints, per step:
- wall time, user and system CPU, minor and major page faults (getrusage around the measured steps) and peak RSS;
- the graph's node count and the anonymous memory loading its session took (Linux: ORT keeps a few KB per node);
- kernel time per op type, split into forward (the nodes the loss depends on) and backward (everything else: the
  gradient, the recomputations, the lowered training ops), with each type's share of all kernel time.
A node the optimizer created (a fusion) is matched to the graph node whose name it extends; what matches none is
counted as "unmatched". Profiling adds a little overhead per node: compare shares, not absolute times, with runs
that do not profile.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path


def forward_nodes(model_path: str, loss: str) -> tuple[set[str], set[str], int]:
    """(names of the nodes the loss depends on, names of all nodes, the node count) of the training-step graph."""
    import onnx

    graph = onnx.load(model_path, load_external_data=False).graph
    producer = {out: node for node in graph.node for out in node.output}
    forward, stack = set(), [loss]
    while stack:
        node = producer.get(stack.pop())
        if node is None or node.name in forward:
            continue
        forward.add(node.name)
        stack.extend(node.input)
    return forward, {node.name for node in graph.node}, len(graph.node)


def classify(name: str, forward: set[str], known: set[str]) -> str:
    """forward / backward for a profiled node name (fused nodes keep their first node's name as a prefix)."""
    if name in known:
        return "forward" if name in forward else "backward"
    candidates = [k for k in known if k and name.startswith(k)]
    if candidates:
        best = max(candidates, key=len)
        return "forward" if best in forward else "backward"
    return "unmatched"


def kernel_times(trace: list[dict], runs: int) -> list[dict]:
    """Node kernel events of the last `runs` model runs of a profile trace."""
    starts = sorted((e["ts"], e["ts"] + e["dur"]) for e in trace if e.get("cat") == "Session"
                    and e.get("name") == "model_run")
    windows = starts[-runs:]
    out = []
    for e in trace:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        if any(a <= e["ts"] <= b for a, b in windows):
            out.append({"node": e["name"][: -len("_kernel_time")], "op": e.get("args", {}).get("op_name", "?"),
                        "us": e["dur"]})
    return out


def node_kind(name: str) -> str:
    """A node name with its numbers folded (layers.3 -> layers.#, chunk12 -> chunk#): one row per kind of node."""
    return re.sub(r"\d+", "#", name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=2, help="measured steps after one warm-up step")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--top", type=int, default=20, help="op types listed (the rest summed)")
    p.add_argument("--nodes", type=int, default=0, help="also list the N costliest node kinds (names with their "
                                                         "layer and chunk numbers folded: what to optimise next)")
    p.add_argument("--json", help="write the figures here")
    a = p.parse_args(argv)

    import numpy as np

    from lars_artifacts import load_bundle
    from lars_ort.data import Batch
    from lars_ort.engine_ort import OrtEngine
    from lars_artifacts.measure import peak_rss_mb, rss_split_mb

    bundle = load_bundle(a.bundle, verify=False)
    with tempfile.TemporaryDirectory(prefix="lars-profile-") as tmp:
        loading = rss_split_mb()
        engine = OrtEngine(bundle, load_eval=False, threads=a.threads, profile_prefix=str(Path(tmp) / "step"))
        loaded = rss_split_mb()
        rng = np.random.default_rng(0)
        ids = rng.integers(0, bundle.manifest.vocab_size, size=(a.batch_size, a.seq_len))
        labels = np.roll(ids, -1, axis=1)
        labels[:, -1] = -100
        batch = Batch(ids, np.ones_like(ids), labels)
        engine.forward_backward(batch)  # warm-up: first-run allocations and lazy initialisation
        before, clock = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for _ in range(a.steps):
            engine.forward_backward(batch)
        wall = time.perf_counter() - clock
        after = resource.getrusage(resource.RUSAGE_SELF)
        trace = json.loads(Path(engine.session.end_profiling()).read_text())
    forward, known, node_count = forward_nodes(bundle.file(engine.spec.training), engine.spec.loss)
    # what loading the session took (ORT keeps a few KB per graph node: node count is memory)
    session_mb = loaded[1] - loading[1] if loading and loaded else None
    events = kernel_times(trace, a.steps)

    by_op: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    side: dict[str, str] = {}  # node name -> forward/backward/unmatched, once per name (the prefix scan is slow)
    for e in events:
        if e["node"] not in side:
            side[e["node"]] = classify(e["node"], forward, known)
        by_op[e["op"]][side[e["node"]]] += e["us"] / 1e3 / a.steps
    total = sum(sum(v.values()) for v in by_op.values())
    n = a.steps
    summary = {"bundle": str(a.bundle), "seq_len": a.seq_len, "batch_size": a.batch_size, "threads": a.threads,
               "steps": n, "wall_s": wall / n, "user_s": (after.ru_utime - before.ru_utime) / n,
               "system_s": (after.ru_stime - before.ru_stime) / n,
               "minor_faults": (after.ru_minflt - before.ru_minflt) / n,
               "major_faults": (after.ru_majflt - before.ru_majflt) / n, "peak_rss_mb": peak_rss_mb(),
               "graph_nodes": node_count, "session_anon_mb": session_mb, "kernel_ms": total,
               "forward_ms": sum(v.get("forward", 0.0) for v in by_op.values()),
               "backward_ms": sum(v.get("backward", 0.0) for v in by_op.values()),
               "unmatched_ms": sum(v.get("unmatched", 0.0) for v in by_op.values())}
    print(f"{a.bundle}: batch {a.batch_size} x {a.seq_len} tokens, {a.threads} threads, per step over {n} steps")
    print(f"wall {summary['wall_s']:.2f} s, user {summary['user_s']:.2f} s, system {summary['system_s']:.2f} s, "
          f"{summary['minor_faults']:,.0f} minor / {summary['major_faults']:,.0f} major page faults, "
          f"peak RSS {summary['peak_rss_mb']:,.0f} MB")
    if session_mb is not None:
        print(f"session: {node_count:,} graph nodes, +{session_mb:,.0f} MB anonymous once loaded "
              f"({1024 * session_mb / node_count:.1f} KB per node)")
    print(f"kernel time {total:,.0f} ms: forward {summary['forward_ms']:,.0f} ms, backward "
          f"{summary['backward_ms']:,.0f} ms, unmatched {summary['unmatched_ms']:,.0f} ms\n")
    print("| op type | ms / step | share | forward ms | backward ms |")
    print("|---|---|---|---|---|")
    ranked = sorted(by_op.items(), key=lambda kv: -sum(kv[1].values()))
    rows = []
    for op, parts in ranked:
        ms = sum(parts.values())
        rows.append({"op": op, "ms": ms, "share": ms / total if total else 0.0, "forward_ms": parts.get("forward", 0.0),
                     "backward_ms": parts.get("backward", 0.0), "unmatched_ms": parts.get("unmatched", 0.0)})
    for r in rows[: a.top]:
        print(f"| {r['op']} | {r['ms']:,.1f} | {r['share']:.1%} | {r['forward_ms']:,.1f} | {r['backward_ms']:,.1f} |")
    rest = rows[a.top:]
    if rest:
        ms = sum(r["ms"] for r in rest)
        print(f"| {len(rest)} other types | {ms:,.1f} | {ms / total if total else 0:.1%} | "
              f"{sum(r['forward_ms'] for r in rest):,.1f} | {sum(r['backward_ms'] for r in rest):,.1f} |")
    kinds: dict[tuple[str, str, str], list[float]] = defaultdict(lambda: [0.0, 0])
    for e in events:
        kind = kinds[(node_kind(e["node"]), e["op"], side[e["node"]])]
        kind[0] += e["us"] / 1e3 / n
        kind[1] += 1 / n
    node_rows = [{"kind": k, "op": op, "side": s, "ms": ms, "count": count, "share": ms / total if total else 0.0}
                 for (k, op, s), (ms, count) in sorted(kinds.items(), key=lambda kv: -kv[1][0])]
    if a.nodes:
        print("\n| node kind | op | side | ms / step | share | nodes / step |")
        print("|---|---|---|---|---|---|")
        for r in node_rows[: a.nodes]:
            print(f"| {r['kind']} | {r['op']} | {r['side']} | {r['ms']:,.1f} | {r['share']:.1%} | {r['count']:,.0f} |")
    if a.json:
        Path(a.json).write_text(json.dumps({**summary, "ops": rows, "node_kinds": node_rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
