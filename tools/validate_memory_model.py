"""The memory model (lars_artifacts.memory_model) against measured peaks: predicted / measured for every bundle row
of bench_memory JSON files run with the runtime's default settings or with exact arena regions (MODE@exact: the
regions a bundle exported with --memory-budget runs with).

    python tools/validate_memory_model.py docs/bench/memory_passes_smollm2.json [more.json ...]

Rows carry the model's dims since bench_memory records them; older rows (all SmolLM2-135M, LoRA r=8 on all seven
projections) get SmolLM2's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

# SmolLM2-135M, the model of every stored benchmark run.
SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=8192)
ALL_TARGETS = "q,k,v,o,gate,up,down"


def compare(rows: list[dict]) -> list[dict]:
    """predicted vs measured peak (MB) for each bundle row measured with the runtime's defaults or exact arena
    regions (the same model: the arena setting moves the peak, not what is alive)."""
    from bench_memory import BUNDLE_MODES, is_baseline, split_mode

    from lars_export.budget import model_for
    from lars_export.config import ExportConfig

    out = []
    for r in rows:
        base, setting = split_mode(r["mode"])
        # (MODE~base rows ran an earlier exporter's bundle, which today's settings of the mode do not describe)
        if base not in BUNDLE_MODES or setting not in ("", "exact") or r["status"] != "ok" or is_baseline(r["mode"]):
            continue
        settings = dict(BUNDLE_MODES[base])
        if r.get("loss_chunks") is not None:  # bench_memory --loss-chunks overrode the mode's
            settings["loss_chunks"] = r["loss_chunks"]
        config = ExportConfig(**settings, lora_rank=r.get("rank", 8),
                              targets=tuple(r.get("targets", ALL_TARGETS).split(",")))
        arch = r.get("arch", SMOLLM2)
        if not r.get("tied_table_once"):  # measured on a bundle that stored a tied table twice (earlier exporters)
            arch = {**arch, "tie_word_embeddings": False}
        # (rows without the key were measured on bundles exported before the cheap_recompute pass)
        model = model_for(arch, config, None if r.get("cheap_recompute") else {"cheap_recompute": False})
        predicted = model.peak_bytes(r.get("batch_size", 1), r["seq_len"]) / 2**20
        out.append({"mode": r["mode"], "seq_len": r["seq_len"], "measured_mb": r["peak_rss_mb"],
                    "predicted_mb": predicted, "ratio": predicted / r["peak_rss_mb"]})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", nargs="+", help="bench_memory JSON files")
    p.add_argument("--out", help="write the compared rows (mode, seq_len, measured, predicted, ratio) as JSON here")
    a = p.parse_args(argv)
    rows = [r for path in a.json for r in json.loads(Path(path).read_text())]
    result = compare(rows)
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print("| mode | seq | measured MB | predicted MB | predicted / measured |\n|---|---|---|---|---|")
    for r in result:
        print(f"| {r['mode']} | {r['seq_len']} | {r['measured_mb']:,.0f} | {r['predicted_mb']:,.0f} | "
              f"{r['ratio']:.3f} |")
    ratios = [r["ratio"] for r in result]
    if ratios:
        print(f"\n{len(ratios)} rows; predicted / measured from {min(ratios):.3f} to {max(ratios):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
