"""A run split in two by an interruption and --resume ends with the same adapter as the uninterrupted run."""

import json

import numpy as np
import pytest

from lars_ort import TrainingArgs, train
from lars_ort.checkpoint import latest
from lars_artifacts.ort_checkpoint import read_checkpoint
from tiny import TRAIN_TEXT


def _args(out, **kw):
    base = dict(data=str(TRAIN_TEXT), out=str(out), steps=6, batch_size=2, seq_len=32, lr=1e-3, warmup_steps=2,
                save_every=2, seed=3, progress=False, threads=1)
    return TrainingArgs(**{**base, **kw})


def _adapters(run):
    return read_checkpoint(latest(run).ort_checkpoint).parameters


def test_interrupted_and_resumed_run_equals_uninterrupted(tiny_bundles, tmp_path):
    bundle = tiny_bundles["llama"]
    whole = train(bundle, _args(tmp_path / "whole"))

    def interrupt_at_3(record):
        if record.get("step") == 3 and "loss" in record:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(bundle, _args(tmp_path / "split"), callbacks=[interrupt_at_3])
    assert latest(tmp_path / "split").state["step"] == 3  # saved on the way out
    resumed = train(bundle, _args(tmp_path / "split", resume=True))

    assert resumed["start_step"] == 3 and resumed["step"] == 6
    np.testing.assert_allclose(whole["losses"][3:], resumed["losses"], rtol=1e-6)
    a, b = _adapters(tmp_path / "whole"), _adapters(tmp_path / "split")
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-6, atol=1e-9, err_msg=name)
    assert any(np.abs(v).max() > 0 for k, v in a.items() if ".lora_B." in k)  # it did train

    lines = [json.loads(x) for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert all({"loss", "tokens_per_s", "peak_rss_mb"} <= set(r) for r in lines if "loss" in r)


def test_checkpoints_are_pruned_and_latest_points_at_newest(tiny_bundles, tmp_path):
    train(tiny_bundles["llama"], _args(tmp_path / "run", steps=7, save_every=2, keep_checkpoints=2))
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["step-00000006", "step-00000007"]
    assert (tmp_path / "run" / "latest").read_text().strip() == "step-00000007"
