"""How close LARS gradients are to exact LoRA: cosine similarity of each module's dA, pca vs random basis.

    python tools/bench_fidelity.py --ranks 8,16,32,64,128 --json fidelity.json

Measured in PyTorch (the independent reference): one forward/backward of the PEFT model on held-out real text;
for every adapter the exact dA = gᵀ·x (g: gradient at x·Aᵀ) and the LARS one gᵀ·x·P·Pᵀ. lora_B is set to a seeded
N(0, 0.02) so that g is not zero (PEFT initialises B = 0). The pca basis comes from the exporter's calibration
text, exactly as `lars-export` computes it; the text here is a different one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_memory import REPO, prepare_model  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--ranks", default="8,16,32,64,128")
    p.add_argument("--data", default=str(REPO / "tests" / "data" / "macbeth_act1_eval.txt"),
                   help="text to take the gradient on (not the calibration text)")
    p.add_argument("--calibration-data", help="default: the exporter's built-in calibration text")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=str(REPO / "out" / "bench"))
    p.add_argument("--json")
    a = p.parse_args(argv)

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lars_export import basis

    torch.manual_seed(a.seed)
    model_dir = prepare_model(a.model, Path(a.cache))
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    peft_model = get_peft_model(model, LoraConfig(r=a.rank, lora_alpha=2 * a.rank, target_modules=list(TARGETS),
                                                  lora_dropout=0.0, task_type="CAUSAL_LM"))
    with torch.no_grad():
        gen = torch.Generator().manual_seed(a.seed)
        for name, prm in peft_model.named_parameters():
            if "lora_B" in name:
                prm.copy_(torch.randn(prm.shape, generator=gen) * 0.02)
    ranks = [int(k) for k in a.ranks.split(",")]
    pca = basis.build_bases("pca", max(ranks), peft_model, tok, a.calibration_data)
    modules = basis.lora_modules(peft_model)

    captured: dict[str, tuple] = {}
    hooks = []
    for name, module in modules.items():
        def hook(mod, args, out, name=name):
            out.retain_grad()
            captured[name] = (args[0].detach(), out)
        hooks.append(module.lora_A["default"].register_forward_hook(hook))
    ids = tok(Path(a.data).read_text(), add_special_tokens=False)["input_ids"]
    n = a.batch_size * a.seq_len
    batch = torch.tensor(ids[:n]).reshape(a.batch_size, a.seq_len)
    peft_model(input_ids=batch, labels=batch).loss.backward()
    for h in hooks:
        h.remove()

    rows = []
    for name, (x, out) in captured.items():
        x2 = x.reshape(-1, x.shape[-1]).double().numpy()
        g = out.grad.reshape(-1, out.shape[-1]).double().numpy()
        exact = g.T @ x2
        target = next(t for t in TARGETS if f".{t}." in name)
        layer = int(name.split(".layers.")[1].split(".")[0])
        for kind in ("pca", "random"):
            for k in ranks:
                d = x2.shape[1]
                P = pca[name][:, :k] if kind == "pca" else basis.random_basis(d, min(k, d), a.seed + d)
                approx = g.T @ (x2 @ P) @ P.T
                cos = float((exact * approx).sum() / (np.linalg.norm(exact) * np.linalg.norm(approx) + 1e-30))
                # share of the input's energy inside the kept subspace (pca: what the basis keeps of x)
                rows.append({"module": name, "target": target, "layer": layer, "basis": kind, "k": k, "cos": cos})

    print(f"\n{model_dir.name}: cosine similarity of LARS dA to exact dA (mean over layers [min]), "
          f"{a.batch_size}x{a.seq_len} tokens of {Path(a.data).name}\n")
    header = "| target | " + " | ".join(f"{kind} k={k}" for kind in ("pca", "random") for k in ranks) + " |"
    print(header + "\n|" + "---|" * (1 + 2 * len(ranks)))
    for target in TARGETS + ("all",):
        cells = []
        for kind in ("pca", "random"):
            for k in ranks:
                vals = [r["cos"] for r in rows if r["basis"] == kind and r["k"] == k
                        and (target == "all" or r["target"] == target)]
                cells.append(f"{np.mean(vals):.3f} [{np.min(vals):.2f}]")
        print(f"| {target} | " + " | ".join(cells) + " |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
