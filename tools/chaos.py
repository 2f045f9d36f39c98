"""Kill `lars-ort train` at random moments, damage its checkpoints, resume, and compare with an uninterrupted run.

    python tools/chaos.py --bundle out/bench/bundle-default-r8-q-k-v-o-gate-up-down --data tests/data/hamlet_act1.txt \\
        --kills 50 --damages 10 --json docs/bench/chaos.json

A reference run trains --steps steps without interruption. Each kill trial starts the same run in a fresh directory,
sends a random signal (SIGKILL, SIGTERM or SIGINT) at a random moment of its life (start-up included), then runs
`--resume` until it completes (killing again while the trial has kills left). Each damage trial stops a run with
SIGTERM half-way, then damages its newest checkpoint (a flipped byte, a truncated or deleted file, a stale `latest`,
a state.json with a negative step) before resuming. A trial passes when every resume starts (none is stuck), the final
adapters and AdamW state equal the reference's bit for bit, and metrics.jsonl holds each step's loss exactly once,
equal to the reference's.

Runs use one ORT thread by default: the comparison is bit for bit, and a fixed thread count keeps the kernels'
reduction order fixed (pass --threads to test another count).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SIGNALS = ("SIGKILL", "SIGTERM", "SIGINT")
DAMAGES = ("flip-byte", "truncate", "delete-checkpoint", "delete-state", "negative-step", "stale-latest",
           "latest-elsewhere")


def train_command(a, out: Path, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "lars_ort.cli", "train", a.bundle, "--data", a.data, "--out", str(out),
           "--steps", str(a.steps), "--batch-size", str(a.batch_size), "--seq-len", str(a.seq_len),
           "--save-every", str(a.save_every), "--lr", str(a.lr), "--warmup-steps", "2", "--seed", "1",
           "--threads", str(a.threads), "--no-progress"]
    return cmd + (["--resume"] if resume else [])


def run_state(out: Path) -> dict[str, np.ndarray]:
    """Adapters and AdamW moments of the run's newest checkpoint, as flat name -> array."""
    from lars_artifacts.ort_checkpoint import read_checkpoint
    from lars_ort.checkpoint import latest

    saved = read_checkpoint(latest(out).ort_checkpoint)
    state = {f"param/{k}": v for k, v in saved.parameters.items()}
    if saved.optimizer is not None:
        state.update({f"m1/{k}": v for k, v in saved.optimizer.first_moments.items()})
        state.update({f"m2/{k}": v for k, v in saved.optimizer.second_moments.items()})
        state["step"] = np.asarray(saved.optimizer.step)
    return state


def step_losses(out: Path) -> list[tuple[int, float]]:
    path = out / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def start(a, out: Path, resume: bool) -> subprocess.Popen:
    return subprocess.Popen(train_command(a, out, resume), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def finish(a, out: Path, resume: bool) -> tuple[int, str]:
    proc = subprocess.run(train_command(a, out, resume), capture_output=True, text=True, timeout=a.timeout)
    return proc.returncode, proc.stderr


def kill_at_random(a, out: Path, resume: bool, rng: random.Random, seconds: float) -> dict:
    proc = start(a, out, resume)
    delay = rng.uniform(0, seconds)
    name = rng.choice(SIGNALS)
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(getattr(signal, name))
    try:
        _, err = proc.communicate(timeout=a.timeout)
    except subprocess.TimeoutExpired:  # a graceful stop that never came: count it, then make sure it is gone
        proc.kill()
        _, err = proc.communicate()
        return {"signal": name, "at_s": round(delay, 2), "code": "hung", "stderr": err[-400:]}
    return {"signal": name, "at_s": round(delay, 2), "code": proc.returncode,
            "traceback": "Traceback" in err, "stderr": err[-400:] if "Traceback" in err else ""}


def damage(out: Path, kind: str, rng: random.Random, elsewhere: Path) -> str:
    ckpts = sorted(p for p in (out / "checkpoints").glob("step-*") if p.is_dir())
    if not ckpts:
        return "no checkpoint to damage"
    newest = ckpts[-1]
    if kind == "flip-byte":
        target = newest / rng.choice(["checkpoint", "state.json", "SHA256SUMS"])
        data = bytearray(target.read_bytes())
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        target.write_bytes(bytes(data))
    elif kind == "truncate":
        target = newest / "checkpoint"
        target.write_bytes(target.read_bytes()[: rng.randrange(target.stat().st_size)])
    elif kind == "delete-checkpoint":
        (newest / "checkpoint").unlink()
    elif kind == "delete-state":
        (newest / "state.json").unlink()
    elif kind == "negative-step":
        state = json.loads((newest / "state.json").read_text())
        state["step"] = -3
        (newest / "state.json").write_text(json.dumps(state))
    elif kind == "stale-latest":
        (out / "latest").write_text(ckpts[0].name + "\n")
    elif kind == "latest-elsewhere":
        (out / "latest").write_text(os.path.relpath(elsewhere, out / "checkpoints") + "\n")
    return f"{kind} in {newest.name}"


def check(out: Path, reference: dict, reference_losses: list) -> dict:
    losses = step_losses(out)
    steps = [s for s, _ in losses]
    state = run_state(out)
    identical = state.keys() == reference.keys() and all(np.array_equal(state[k], reference[k]) for k in reference)
    return {"identical": identical, "duplicate_steps": len(steps) - len(set(steps)),
            "losses_equal": losses == reference_losses}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--kills", type=int, default=50, help="kill trials")
    p.add_argument("--damages", type=int, default=10, help="checkpoint-damage trials")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--save-every", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--keep", help="keep the run directories here (default: a temporary directory)")
    p.add_argument("--json", help="write the trials and counts here")
    a = p.parse_args(argv)
    rng = random.Random(a.seed)
    root = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="lars-chaos-"))
    root.mkdir(parents=True, exist_ok=True)

    began = time.perf_counter()
    code, err = finish(a, root / "reference", resume=False)
    seconds = time.perf_counter() - began
    if code != 0:
        print(f"the reference run failed ({code}): {err.strip().splitlines()[-1:]}", file=sys.stderr)
        return 1
    reference, reference_losses = run_state(root / "reference"), step_losses(root / "reference")
    print(f"reference: {a.steps} steps in {seconds:.1f} s", flush=True)

    trials = []
    for i in range(a.kills + a.damages):
        out = root / f"trial-{i:03d}"
        trial: dict = {"trial": i, "kind": "kill" if i < a.kills else "damage", "events": []}
        if i < a.kills:
            trial["events"].append(kill_at_random(a, out, False, rng, seconds))
        else:
            proc = start(a, out, False)
            while not (out / "latest").exists() and proc.poll() is None:
                time.sleep(0.05)
            time.sleep(rng.uniform(0, seconds / 2))
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=a.timeout)
            trial["events"].append({"damage": damage(out, DAMAGES[(i - a.kills) % len(DAMAGES)], rng,
                                                     root / "reference" / "checkpoints" / "step-00000002")})
        code, err = finish(a, out, resume=True)
        trial["resume_code"] = code
        if code != 0:
            trial["stuck"] = err.strip().splitlines()[-1:] if err.strip() else [f"exit {code}"]
        else:
            trial.update(check(out, reference, reference_losses))
        trial["tracebacks"] = sum(bool(e.get("traceback")) for e in trial["events"]) + ("Traceback" in err)
        trials.append(trial)
        ok = code == 0 and trial["identical"] and trial["losses_equal"] and not trial["duplicate_steps"]
        print(f"trial {i:3d} {trial['kind']:6s} {json.dumps(trial['events'][0])[:90]:90s} "
              f"{'ok' if ok else 'FAIL ' + json.dumps({k: trial.get(k) for k in ('stuck', 'identical', 'duplicate_steps', 'losses_equal')})}",
              flush=True)
        if not a.keep and ok:
            shutil.rmtree(out, ignore_errors=True)

    counts = {
        "trials": len(trials),
        "kills": sum(t["kind"] == "kill" for t in trials),
        "damages": sum(t["kind"] == "damage" for t in trials),
        "resumable": sum(t["resume_code"] == 0 for t in trials),
        "stuck": sum(t["resume_code"] != 0 for t in trials),
        "bit_identical": sum(bool(t.get("identical")) and bool(t.get("losses_equal")) for t in trials),
        "with_duplicate_steps": sum(bool(t.get("duplicate_steps")) for t in trials),
        "hung_after_signal": sum(e.get("code") == "hung" for t in trials for e in t["events"]),
        "tracebacks": sum(t["tracebacks"] for t in trials),
        "signals": {s: sum(e.get("signal") == s for t in trials for e in t["events"]) for s in SIGNALS},
    }
    print("\n| trials | kills | damages | resumable | stuck | bit-identical | duplicate steps | tracebacks |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {counts['trials']} | {counts['kills']} | {counts['damages']} | {counts['resumable']} | {counts['stuck']} "
          f"| {counts['bit_identical']} | {counts['with_duplicate_steps']} | {counts['tracebacks']} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "reference_s": seconds, "counts": counts,
                                            "trials": trials}, indent=1) + "\n")
    if not a.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if counts["bit_identical"] == counts["trials"] else 1


if __name__ == "__main__":
    sys.exit(main())
