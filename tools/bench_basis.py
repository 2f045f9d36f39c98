"""The pca basis phase of `lars-export`, solver by solver: the calibration forward, then each distinct adapter input
solved both ways on the same activations in one process (side by side, so a noisy machine slows both alike).

    python tools/bench_basis.py out/bench-export/qwen2.5-0.5b --json basis.json --plot basis.png

- moment: Σ xᵀx formed (one float32 syrk), then block Krylov on the float64 d×d matrix — the exporter's path for
  inputs up to 32 block widths wide;
- activations: Krylov blocks xᵀ(x·q) straight from the activations (no d×d matrix) — its path for wider inputs.
For each input width: the summed time of each solver, the worst agreement between the two subspaces (1 − the
smallest cosine of their principal angles) and the activation energy each keeps relative to the other. `total` is
what the exporter's choice costs: the forward plus the chosen solver for each input.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a model folder or .gguf, as lars-export takes it")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--plot", help="write a bar chart of the times here (needs matplotlib)")
    a = p.parse_args(argv)

    from lars_export import ExportConfig, adapters, basis, load

    cfg = ExportConfig(model=a.model, out="unused")
    source = load.resolve(cfg.model)
    model = load.load_model(source, load.load_config(source))
    peft_model, _ = adapters.add_lora(model, cfg)
    batches = basis.calibration_batches(load.hf_tokenizer(source), cfg.calibration_data, cfg.calibration_tokens)
    rows: dict[int, dict] = {}
    forward = 0.0
    total = 0.0
    layers = basis.calibration_inputs(peft_model, batches)
    while True:
        t = time.perf_counter()
        layer = next(layers, None)
        forward += time.perf_counter() - t
        if layer is None:
            break
        for x, _ in layer.values():
            d, k = x.shape[1], min(cfg.lars_rank, x.shape[1])
            t = time.perf_counter()
            by_moment = basis.top_eigenvectors(basis._moment(x), k)
            t_moment = time.perf_counter() - t
            t = time.perf_counter()
            by_activations = basis.top_principal_directions(x, k)
            t_activations = time.perf_counter() - t
            wide = basis.solves_on_activations(d, k)
            total += t_activations if wide else t_moment
            cosines = np.linalg.svd(by_moment.T @ by_activations, compute_uv=False)
            energy = [float(np.square(x @ v.astype(np.float32)).sum()) for v in (by_moment, by_activations)]
            r = rows.setdefault(d, dict(width=d, inputs=0, moment_s=0.0, activations_s=0.0, worst_1_minus_cos=0.0,
                                        energy_ratio_min=1.0, path="activations" if wide else "moment"))
            r["inputs"] += 1
            r["moment_s"] += t_moment
            r["activations_s"] += t_activations
            r["worst_1_minus_cos"] = max(r["worst_1_minus_cos"], float(1 - cosines.min()))
            r["energy_ratio_min"] = min(r["energy_ratio_min"], energy[1] / energy[0])
    total += forward
    table = sorted(rows.values(), key=lambda r: r["width"])
    print(f"{'width':>6} {'inputs':>6} {'moment s':>9} {'activations s':>13} {'ratio':>6} {'1-cos':>8} "
          f"{'energy':>10}  exporter's path")
    for r in table:
        print(f"{r['width']:>6} {r['inputs']:>6} {r['moment_s']:>9.1f} {r['activations_s']:>13.1f} "
              f"{r['activations_s'] / r['moment_s']:>6.2f} {r['worst_1_minus_cos']:>8.1e} {r['energy_ratio_min']:>10.8f}"
              f"  {r['path']}")
    moment_only = forward + sum(r["moment_s"] for r in table)
    print(f"calibration forward {forward:.1f} s; basis phase with the moment everywhere {moment_only:.1f} s, "
          f"with the exporter's choice {total:.1f} s")
    summary = dict(model=a.model, forward_s=forward, moment_everywhere_s=moment_only, exporter_s=total, rows=table)
    if a.json:
        Path(a.json).write_text(json.dumps(summary, indent=1) + "\n")
    if a.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        labels = ["forward"] + [f"d={r['width']}" for r in table]
        xs = np.arange(len(labels))
        ax.bar(xs - 0.2, [forward] + [r["moment_s"] for r in table], 0.4, label="moment + Krylov")
        ax.bar(xs + 0.2, [forward] + [r["activations_s"] for r in table], 0.4, label="Krylov on activations")
        ax.set_xticks(xs, labels)
        ax.set_ylabel("seconds (summed over layers)")
        ax.set_title(f"pca basis of {Path(a.model).name}: {moment_only:.0f} s -> {total:.0f} s")
        ax.legend()
        fig.tight_layout()
        fig.savefig(a.plot, dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
