"""Smoke tests: each benchmark runs end to end on a tiny model and writes its table, JSON and plot."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_bench_memory_on_a_tiny_model(tiny_models, tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "tools" / "bench_memory.py"), "--model", str(tiny_models["llama"]),
                          "--seq-lens", "16,32", "--steps", "1", "--cache", str(tmp_path / "cache"),
                          "--json", str(tmp_path / "m.json"), "--plot", str(tmp_path / "m.png")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    rows = json.loads((tmp_path / "m.json").read_text())
    modes = ("peft", "ort-lora", "lars", "lars-random", "floor")
    assert {(r["mode"], r["seq_len"]) for r in rows} == {(m, s) for m in modes for s in (16, 32)}
    assert all(r["status"] == "ok" and r["peak_rss_mb"] > 0 and r["step_s"] > 0 for r in rows), rows
    assert "| ort-lora | 32 |" in out.stdout and "memory slope" in out.stdout
    assert (tmp_path / "m.png").stat().st_size > 0


def test_bench_quality_on_a_tiny_model(tiny_models, tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "tools" / "bench_quality.py"), "--model", str(tiny_models["qwen2"]),
                          "--steps", "4", "--eval-every", "2", "--eval-batches", "1", "--batch-size", "2",
                          "--seq-len", "32", "--lr", "3e-3", "--cache", str(tmp_path / "cache"),
                          "--json", str(tmp_path / "q.json"), "--plot", str(tmp_path / "q.png")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    rows = json.loads((tmp_path / "q.json").read_text())
    for mode in ("peft", "ort-lora", "lars", "lars-random"):
        evals = [r["eval_loss"] for r in rows if r["mode"] == mode and r["eval_loss"] is not None]
        assert len(evals) == 3  # steps 0, 2, 4
    # Same start, same data, same optimizer: exact LoRA in ORT tracks PEFT closely.
    peft = [r["eval_loss"] for r in rows if r["mode"] == "peft" and r["eval_loss"] is not None]
    ours = [r["eval_loss"] for r in rows if r["mode"] == "ort-lora" and r["eval_loss"] is not None]
    assert abs(peft[0] - ours[0]) < 1e-4 and abs(peft[-1] - ours[-1]) / peft[-1] < 1e-2
    assert "| ort-lora |" in out.stdout
