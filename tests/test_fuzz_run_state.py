"""Fuzz the run directory: seeded random damage to each of its files, then train --resume, eval --run and
export-adapter. Each either works from an intact checkpoint (exit 0, finite adapters equal to a saved step's) or
ends with exit 2 and one `error:` line; never a traceback, a crash, or an adapter from a damaged file."""

import json
import random
import shutil

import numpy as np
import pytest

from lars_artifacts.ort_checkpoint import read_checkpoint
from lars_ort import TrainingArgs, train
from lars_ort.cli import main as ort_main
from tiny import TRAIN_TEXT

CASES = 40
FILES = ("run.json", "metrics.jsonl", "latest", "checkpoints/step-00000004/checkpoint",
         "checkpoints/step-00000004/state.json", "checkpoints/step-00000004/SHA256SUMS",
         "checkpoints/step-00000003/checkpoint", "checkpoints/step-00000004", "checkpoints")
DAMAGES = ("flip", "truncate", "delete", "garbage", "empty", "directory", "json-types")


@pytest.fixture(scope="module")
def base_run(tiny_bundles, tmp_path_factory):
    run = tmp_path_factory.mktemp("fuzz-run") / "run"
    train(tiny_bundles["llama"], TrainingArgs(data=str(TRAIN_TEXT), out=str(run), steps=4, batch_size=2, seq_len=32,
                                              save_every=1, keep_checkpoints=3, progress=False, threads=1))
    saved = {int(p.name[5:]): read_checkpoint(p / "checkpoint").parameters
             for p in sorted((run / "checkpoints").glob("step-*"))}
    assert sorted(saved) == [2, 3, 4]
    return run, saved


def _damage(run, rng):
    name, kind = rng.choice(FILES), rng.choice(DAMAGES)
    path = run / name
    if path.is_dir():
        if kind in ("delete", "empty"):
            shutil.rmtree(path)
        else:  # a file where the directory was
            shutil.rmtree(path)
            path.write_bytes(bytes(rng.randrange(256) for _ in range(64)))
        return f"{kind} {name}"
    data = path.read_bytes()
    if kind == "flip" and data:
        b = bytearray(data)
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(b))
    elif kind == "truncate":
        path.write_bytes(data[: rng.randrange(max(1, len(data)))])
    elif kind == "delete":
        path.unlink()
    elif kind == "garbage":
        path.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 2000))))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "directory":
        path.unlink()
        path.mkdir()
    else:  # valid JSON of the wrong shape
        path.write_text(json.dumps(rng.choice([[], 3, None, "x", {"step": "4"}, {"args": []}, {"bundle_id": 1}])))
    return f"{kind} {name}"


def _one_line_or_ok(code, err, what):
    assert "Traceback" not in err, (what, err)
    assert code in (0, 2), (what, code, err)
    if code == 2:
        assert len([x for x in err.splitlines() if x.startswith("error:")]) == 1, (what, err)


@pytest.mark.parametrize("case", range(CASES))
def test_damaged_run_state(base_run, tiny_bundles, tmp_path, capsys, case):
    source, saved = base_run
    rng = random.Random(case)
    run = tmp_path / "run"
    shutil.copytree(source, run)
    what = [_damage(run, rng) for _ in range(rng.choice([1, 1, 2]))]

    code = ort_main(["export-adapter", str(run), "--out", str(tmp_path / "adapter")])
    _one_line_or_ok(code, capsys.readouterr().err, what)
    if code == 0:  # the adapter is one of the saved steps', bit for bit
        from safetensors.numpy import load_file

        exported = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
        assert all(np.isfinite(v).all() for v in exported.values())
        assert any(sorted(np.concatenate([v.ravel() for v in exported.values()]).tolist())
                   == sorted(np.concatenate([v.ravel() for v in step.values()]).tolist()) for step in saved.values())

    code = ort_main(["eval", str(tiny_bundles["llama"]), "--data", str(TRAIN_TEXT), "--run", str(run),
                     "--seq-len", "32", "--batch-size", "2"])
    captured = capsys.readouterr()
    _one_line_or_ok(code, captured.err, what)

    code = ort_main(["train", str(tiny_bundles["llama"]), "--data", str(TRAIN_TEXT), "--out", str(run),
                     "--steps", "6", "--batch-size", "2", "--seq-len", "32", "--save-every", "1",
                     "--keep-checkpoints", "3", "--no-progress", "--threads", "1", "--resume", "--resume-with-changes"])
    _one_line_or_ok(code, capsys.readouterr().err, what)
