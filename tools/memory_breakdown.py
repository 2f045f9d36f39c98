"""What a bundle's training graph keeps alive for the backward: the tensors the forward saves, by kind, in MB.

    python tools/memory_breakdown.py BUNDLE [BUNDLE ...] --seq-lens 512,1024,2048 [--json out.json]

The training graph is split into forward and backward (backward = every node the loss and logits do not need); a
tensor is *saved* when a forward node produces it and a backward node reads more than its shape. Those tensors are
all alive at the turn from forward to backward, which is where a LoRA step peaks (plus the loss' transient
[T, vocab] tensors and the frozen weights, reported on their own rows). Shapes are measured, not guessed: the graph
runs in onnxruntime at two probe lengths with every saved tensor as an extra output, and each dimension, taken as
linear in the length (the length itself, a constant, or a chunk's share of it), is then scaled to the requested
lengths. Views (Reshape, Squeeze, Unsqueeze, Identity) share their input's buffer in ORT and are counted once. The
definitions (backward, saved, views) are the passes' own, from lars_export.passes._ir.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
TRANSIENTS = "loss transients at the turn (not saved)"
PROBES = (97, 194)  # two lengths, so each dimension's growth with the length is measured, not guessed

# (kind, test on the saved tensor's name and producer) in priority order; the first match wins.
KINDS = [
    ("attention probabilities (T²)", lambda name, op: op == "Softmax"),
    ("LARS projections x·P", lambda name, op: name.endswith(".lars_xP")),
    ("adapter inputs x", lambda name, op: name.endswith("input_layernorm/Mul_1_output_0")
     or name.endswith("post_attention_layernorm/Mul_1_output_0")
     or "self_attn/Reshape_7_output_0" in name or name.endswith("mlp/Mul_output_0")),
    ("LoRA hidden x·Aᵀ (rank r)", lambda name, op: "/default/MatMul_output_0" in name),
    ("loss (log-probabilities, T×vocab)", lambda name, op: op.startswith("SoftmaxCrossEntropy")),
    ("attention Q, K, V", lambda name, op: "self_attn" in name),
    ("MLP activations", lambda name, op: "/mlp/" in name),
    ("norms and residuals", lambda name, op: "norm" in name or "/Add" in name),
]


def saved_tensors(model) -> dict[str, tuple[str, set[str]]]:
    """Saved buffer -> (op type of its producer, every name it is read by: views share their input's buffer)."""
    from lars_export.passes._base import SHAPE_OPS
    from lars_export.passes._ir import backward_nodes, ir_graph, saved_for_backward, view_chain

    graph = ir_graph(model)
    backward_list = backward_nodes(graph)
    backward = set(backward_list)
    out: dict[str, tuple[str, set[str]]] = {}
    for root, readers in saved_for_backward(graph, backward_list).items():
        op = root.producer().op_type
        if op in SHAPE_OPS:
            continue
        aliases = {root.name}
        for reader in readers:
            for value in reader.inputs:
                chain = view_chain(value, backward) if value is not None else []
                if chain and chain[-1] is root:
                    aliases.update(v.name for v in chain)
        out[root.name] = (op, aliases)
    return out


def kind_of(aliases: set[str], op: str) -> str:
    return next((kind for kind, test in KINDS if any(test(name, op) for name in sorted(aliases))), "other")


def probe_shapes(bundle: Path, names: list[str], lengths=PROBES) -> dict[str, tuple[list[tuple[int, ...]], int]]:
    """Run the training graph at each probe length; return each tensor's shapes (one per length) and item size."""
    import onnx
    from onnxruntime.capi import _pybind_state as C

    from lars_artifacts import TRAINING_STEP

    C.set_default_logger_severity(3)
    model = onnx.load(str(bundle / TRAINING_STEP), load_external_data=False)  # standard ONNX: plain ORT runs it
    known = {o.name for o in model.graph.output}
    for name in names:
        if name not in known:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    probe = bundle / ".probe_training_model.onnx"  # beside the weights file, which the graph names relatively
    onnx.save_model(model, str(probe))
    try:
        options = C.SessionOptions()
        options.graph_optimization_level = C.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every name
        sess = C.InferenceSession(options, str(probe), True, False)
        sess.initialize_session(["CPUExecutionProvider"], [{}], set())
        runs = []
        for length in lengths:
            feeds = {}
            for arg in sess.inputs_meta:
                shape = [d if isinstance(d, int) else 1 for d in arg.shape]
                if arg.name in ("input_ids", "attention_mask"):
                    feeds[arg.name] = np.ones((1, length), np.int64)
                elif arg.name == "labels":  # flattened like the logits: [batch * sequence]
                    feeds[arg.name] = np.ones((length,), np.int64)
                elif arg.type == "tensor(bool)":
                    feeds[arg.name] = np.array(True) if not shape else np.ones(shape, bool)
                else:
                    feeds[arg.name] = np.zeros(shape, np.float32)
            runs.append(sess.run(names, feeds, None))
    finally:
        probe.unlink(missing_ok=True)
    return {n: ([tuple(run[k].shape) for run in runs], runs[0][k].dtype.itemsize) for k, n in enumerate(names)}


def scaled_elements(shapes: list[tuple[int, ...]], seq: int, lengths=PROBES) -> float:
    """A tensor's element count at `seq` tokens from its shapes at the two probe lengths, each dimension taken as
    linear in the length (the length itself, a constant, or a share of it such as a chunk's rows T·j / N)."""
    (t1, t2), (s1, s2) = lengths, shapes
    return float(np.prod([a + (b - a) / (t2 - t1) * (seq - t1) for a, b in zip(s1, s2)]))


def breakdown(bundle: Path, seq_lens: list[int]) -> dict:
    import onnx

    from lars_artifacts import TRAINING_STEP, load_bundle

    manifest = load_bundle(bundle).manifest
    model = onnx.load(str(bundle / TRAINING_STEP), load_external_data=False)
    saved = saved_tensors(model)
    shapes = probe_shapes(bundle, sorted(saved))
    vocab = manifest.vocab_size
    rows: dict[str, dict[int, float]] = defaultdict(lambda: defaultdict(float))
    counts: dict[str, int] = defaultdict(int)
    for name, (op, aliases) in saved.items():
        probed, itemsize = shapes[name]
        kind = kind_of(aliases, op)
        counts[kind] += 1
        for seq in seq_lens:
            rows[kind][seq] += scaled_elements(probed, seq) * itemsize / 2**20
    chunked = next((p["details"]["chunks"] for p in manifest.passes if p["name"] == "chunked_loss" and p["changed"]),
                   None)
    for seq in seq_lens:
        # Not saved but alive at the turn. Whole loss: the logits (a graph output) and their gradient, two more
        # [T, vocab] tensors. Chunked loss: one chunk's logits, log-probabilities and gradient (all in the forward).
        whole = 2 * seq * vocab * 4 / 2**20
        rows[TRANSIENTS][seq] = whole if chunked is None else 3 * -(-seq // chunked) * vocab * 4 / 2**20
    counts[TRANSIENTS] = 2 if chunked is None else 3
    names = defaultdict(list)
    for name, (op, aliases) in sorted(saved.items()):
        names[kind_of(aliases, op)].append(f"{name} {op} {list(shapes[name][0][0])}")
    return {"bundle": str(bundle), "lars": manifest.adapter.get("lars", {}),
            "frozen_weight_mb": manifest.adapter["frozen_weight_bytes"] / 2**20,
            "rows": {k: {str(s): v for s, v in by_len.items()} for k, by_len in rows.items()},
            "tensors": dict(counts), "names": dict(names)}


def _mb(v: float) -> str:
    return f"{v:,.0f}" if v >= 10 else f"{v:.2f}"


def table(result: dict, seq_lens: list[int]) -> str:
    head = "| saved for the backward | tensors | " + " | ".join(f"{s} tok MB" for s in seq_lens) + " |"
    lines = [head, "|" + "---|" * (len(seq_lens) + 2)]
    order = [k for k, _ in KINDS] + ["other", TRANSIENTS]
    total = defaultdict(float)
    for kind in order:
        if kind not in result["rows"]:
            continue
        vals = [result["rows"][kind][str(s)] for s in seq_lens]
        for s, v in zip(seq_lens, vals):
            total[s] += v
        lines.append(f"| {kind} | {result['tensors'][kind]} | " + " | ".join(_mb(v) for v in vals) + " |")
    lines.append("| **total at the turn** | | " + " | ".join(f"**{_mb(total[s])}**" for s in seq_lens) + " |")
    lines.append("| frozen weights (file, held once) | | " +
                 " | ".join(f"{result['frozen_weight_mb']:,.0f}" for _ in seq_lens) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    sys.path.insert(0, str(REPO))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundles", nargs="+", type=Path)
    p.add_argument("--seq-lens", default="512,1024,2048")
    p.add_argument("--json", help="write the breakdowns here")
    p.add_argument("--list", action="store_true", help="print every saved tensor with its kind and probe shape")
    a = p.parse_args(argv)
    seq_lens = [int(s) for s in a.seq_lens.split(",")]
    results = []
    for bundle in a.bundles:
        result = breakdown(bundle, seq_lens)
        results.append(result)
        lars = result["lars"]
        print(f"\n{bundle} (LARS basis {lars.get('basis')}, rank {lars.get('rank')}), batch 1\n")
        print(table(result, seq_lens))
        if a.list:
            for kind, names in result["names"].items():
                print(f"\n{kind}:\n  " + "\n  ".join(names))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
