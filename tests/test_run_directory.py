"""The run directory never loses a run or resumes it wrong: killed starts, missing or misleading `latest`, damaged
checkpoints, changed arguments, concurrent trainers, signals, full disks, NaN and divergence (issue 12)."""

import errno
import json
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from lars_artifacts import LarsError
from lars_artifacts.ort_checkpoint import read_checkpoint
from lars_ort import Trainer, TrainingArgs, train
from lars_ort import checkpoint as ckpt
from lars_ort.cli import main as ort_main
from lars_ort.engine import NonFiniteStep
from lars_ort.health import TrainingHealth
from tiny import TRAIN_TEXT

STEPS = 6


def _args(out, **kw):
    base = dict(data=str(TRAIN_TEXT), out=str(out), steps=STEPS, batch_size=2, seq_len=32, lr=1e-3, warmup_steps=2,
                save_every=2, seed=3, progress=False, threads=1)
    return TrainingArgs(**{**base, **kw})


def _state(run):
    saved = read_checkpoint(ckpt.latest(run).ort_checkpoint)
    return {**saved.parameters, **{f"m1/{k}": v for k, v in saved.optimizer.first_moments.items()},
            **{f"m2/{k}": v for k, v in saved.optimizer.second_moments.items()}}


def _assert_same_run(a, b):
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    for name in sa:
        assert np.array_equal(sa[name], sb[name]), name


def _loss_steps(run):
    return [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


@pytest.fixture(scope="module")
def whole(tiny_bundles, tmp_path_factory):
    """The uninterrupted run every interrupted one is compared with."""
    run = tmp_path_factory.mktemp("whole") / "run"
    train(tiny_bundles["llama"], _args(run))
    return run


def _stop_after(step):
    def callback(record):
        if record.get("step") == step and "loss" in record:
            raise KeyboardInterrupt
    return callback


def test_resume_without_latest_and_with_latest_pointing_elsewhere(tiny_bundles, whole, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(tiny_bundles["llama"], _args(run), callbacks=[_stop_after(4)])
    (run / "latest").unlink()  # a kill between the rename and the pointer; the step-4 directory is complete
    summary = train(tiny_bundles["llama"], _args(run, resume=True))
    assert summary["start_step"] == 4
    _assert_same_run(whole, run)

    (run / "latest").write_text("../../" + str(whole.relative_to(whole.anchor)) + "/checkpoints/step-00000002\n")
    assert ckpt.latest(run).path.name == f"step-{STEPS:08d}"  # `latest` is not followed anywhere


def test_killed_before_the_first_checkpoint_resumes_from_step_zero(tiny_bundles, whole, tmp_path, capsys):
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):  # raised before step 1 finished: nothing to save
        train(tiny_bundles["llama"], _args(run, eval_data=str(TRAIN_TEXT), eval_batches=1),
              callbacks=[lambda r: (_ for _ in ()).throw(KeyboardInterrupt) if "eval_loss" in r else None])
    assert (run / "run.json").exists() and not ckpt.step_dirs(run)
    summary = train(tiny_bundles["llama"], _args(run, resume=True))
    assert summary["start_step"] == 0
    _assert_same_run(whole, run)
    # a directory with nothing in it (killed before run.json) starts with a warning
    code = ort_main(["train", str(tiny_bundles["llama"]), "--data", str(TRAIN_TEXT), "--out", str(tmp_path / "new"),
                     "--resume", "--steps", "1", "--batch-size", "1", "--seq-len", "16", "--no-progress"])
    assert code == 0 and "holds no run to resume" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["flip", "truncate", "negative-step", "sums"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tiny_bundles, whole, tmp_path, damage, capsys):
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(tiny_bundles["llama"], _args(run), callbacks=[_stop_after(5)])
    newest = run / "checkpoints" / "step-00000005"
    if damage == "flip":
        data = bytearray((newest / "checkpoint").read_bytes())
        data[len(data) // 2] ^= 0x01  # one bit of a tensor: still parses, only the sha256 can tell
        (newest / "checkpoint").write_bytes(bytes(data))
    elif damage == "truncate":
        (newest / "checkpoint").write_bytes((newest / "checkpoint").read_bytes()[:100])
    elif damage == "negative-step":
        state = json.loads((newest / "state.json").read_text())
        state["step"] = -3
        (newest / "state.json").write_text(json.dumps(state))
        (newest / "SHA256SUMS").write_text(ckpt._sha256_lines(newest, ("checkpoint", "state.json")))
    else:
        (newest / "SHA256SUMS").write_text("0" * 64 + "  checkpoint\n")
    saved = ckpt.latest(run)
    assert saved.step == 4 and len(saved.skipped) == 1 and "step-00000005" in saved.skipped[0]
    code = ort_main(["train", str(tiny_bundles["llama"]), *_cli(_args(run, resume=True))])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "skipped a damaged checkpoint" in err and "step-00000005" in err
    _assert_same_run(whole, run)
    assert _loss_steps(run) == list(range(1, STEPS + 1))  # step 5 trained twice, recorded once


def _cli(args: TrainingArgs) -> list[str]:
    out = []
    for name, value in args.to_dict().items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + flag[2:])
        elif value is not None:
            out += [flag, str(value)]
    return out


def test_every_checkpoint_damaged_is_one_error_naming_them(tiny_bundles, tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_bundles["llama"], _args(run, steps=4))
    for d in ckpt.step_dirs(run):
        (d / "checkpoint").write_bytes(b"\0" * 64)
    for argv in (["train", str(tiny_bundles["llama"]), *_cli(_args(run, steps=4, resume=True))],
                 ["export-adapter", str(run), "--out", str(tmp_path / "adapter")],
                 ["eval", str(tiny_bundles["llama"]), "--data", str(TRAIN_TEXT), "--run", str(run)]):
        code = ort_main(argv)
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err, err
        assert "every checkpoint of run" in err and "step-00000004" in err and "step-00000002" in err
    assert not (tmp_path / "adapter" / "adapter_model.safetensors").exists()


def test_resume_with_changed_arguments_is_refused_unless_asked(tiny_bundles, tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_bundles["llama"], _args(run, steps=2))
    for change in (dict(seed=4), dict(batch_size=1), dict(seq_len=16), dict(steps=4), dict(lr=2e-3)):
        with pytest.raises(LarsError, match="would not continue run") as e:
            train(tiny_bundles["llama"], _args(run, resume=True, **change))
        assert f"--{next(iter(change)).replace('_', '-')}" in str(e.value) and "--resume-with-changes" in str(e.value)
    summary = train(tiny_bundles["llama"], _args(run, resume=True, steps=4, resume_with_changes=True))
    assert summary["start_step"] == 2 and summary["step"] == 4
    info = json.loads((run / "run.json").read_text())
    assert info["args"]["steps"] == 4 and info["resumes"][-1]["changed"] == {"steps": [2, 4]}


def test_a_second_trainer_on_the_same_run_is_refused(tiny_bundles, tmp_path):
    run = tmp_path / "run"
    train(tiny_bundles["llama"], _args(run, steps=2))
    with ckpt.RunLock(run):
        code = subprocess.run([sys.executable, "-m", "lars_ort.cli", "train", str(tiny_bundles["llama"]),
                               *_cli(_args(run, steps=4, resume=True, resume_with_changes=True))],
                              capture_output=True, text=True)
    assert code.returncode == 2, code.stderr
    assert "is being trained by pid" in code.stderr and "Traceback" not in code.stderr
    assert ckpt.latest(run).step == 2


def _wait_for(path, timeout=120):
    began = time.time()
    while not path.exists():
        assert time.time() - began < timeout, f"{path} never appeared"
        time.sleep(0.02)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_finishes_the_step_saves_and_resumes_bit_identical(tiny_bundles, tmp_path, sig):
    steps = 400  # long enough that the signal lands mid-run
    whole = tmp_path / "whole"
    train(tiny_bundles["llama"], _args(whole, steps=steps, save_every=100))
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "lars_ort.cli", "train", str(tiny_bundles["llama"]),
           *_cli(_args(run, steps=steps, save_every=100))]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    _wait_for(run / "metrics.jsonl")
    time.sleep(0.3)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    stopped = ckpt.latest(run).step
    assert 0 < stopped < steps and f"stopped by {sig.name} after step {stopped}" in err, err
    assert _loss_steps(run) == list(range(1, stopped + 1))
    subprocess.run(cmd + ["--resume"], check=True, capture_output=True)
    _assert_same_run(whole, run)
    assert _loss_steps(run) == list(range(1, steps + 1))


def test_sigkill_at_any_moment_resumes_bit_identical_without_duplicate_metrics(tiny_bundles, tmp_path):
    steps = 300
    whole = tmp_path / "whole"
    train(tiny_bundles["llama"], _args(whole, steps=steps, save_every=7))
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "lars_ort.cli", "train", str(tiny_bundles["llama"]),
           *_cli(_args(run, steps=steps, save_every=7))]
    for delay in (0.1, 0.25):  # after some checkpoints, then again mid-way through the resumed run
        proc = subprocess.Popen(cmd + ["--resume"], stderr=subprocess.DEVNULL)
        _wait_for(run / "checkpoints")
        time.sleep(delay)
        proc.kill()
        proc.wait()
    subprocess.run(cmd + ["--resume"], check=True, capture_output=True)
    _assert_same_run(whole, run)
    assert _loss_steps(run) == list(range(1, steps + 1))


def test_full_disk_is_one_error_and_leaves_no_partial_checkpoint(tiny_bundles, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    train(tiny_bundles["llama"], _args(run, steps=2))
    from lars_ort import engine_ort

    def full(self, path):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(engine_ort.OrtEngine, "save", full)
    code = ort_main(["train", str(tiny_bundles["llama"]), *_cli(_args(run, steps=4, resume=True,
                                                                     resume_with_changes=True))])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    line = [x for x in err.splitlines() if x.startswith("error:")][0]
    assert "No space left on device" in line and "step-00000002 is intact" in line and "--resume" in line
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002"]  # no .tmp left
    assert ckpt.latest(run).step == 2


def test_a_short_disk_prunes_before_writing(tiny_bundles, tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(tiny_bundles["llama"], _args(run, steps=2, save_every=1, keep_checkpoints=2))
    assert [p.name for p in ckpt.step_dirs(run)] == ["step-00000001", "step-00000002"]
    seen = []
    real_usage = shutil.disk_usage

    def short(path):  # room for one more checkpoint only once the oldest is gone
        seen.append([p.name for p in ckpt.step_dirs(run)])
        usage = real_usage(path)
        return usage._replace(free=1000 if len(seen[-1]) > 1 else usage.free)

    monkeypatch.setattr(ckpt.shutil, "disk_usage", short)
    train(tiny_bundles["llama"], _args(run, steps=3, save_every=1, resume=True, resume_with_changes=True))
    assert seen[0] == ["step-00000001", "step-00000002"] and seen[-1] == ["step-00000002"]
    assert [p.name for p in ckpt.step_dirs(run)] == ["step-00000002", "step-00000003"]


def test_non_finite_step_is_skipped_and_never_saved(tiny_bundles, tmp_path):
    trainer = Trainer(tiny_bundles["llama"], load_eval=False, threads=1)
    batch = trainer.text_batch(["To be, or not to be, that is the question"])
    before = trainer.adapter_tensors()
    poisoned = {k: np.full_like(v, np.inf) if ".lora_A." in k else v for k, v in before.items()}
    trainer.engine.set_adapter_tensors(poisoned)
    with pytest.raises(NonFiniteStep, match="update was skipped"):
        trainer.step(batch, 1e-3)
    after = trainer.adapter_tensors()
    for k in before:
        np.testing.assert_array_equal(after[k], poisoned[k])  # nothing applied
    with pytest.raises(LarsError, match="holds NaN or inf"):
        ckpt.save(tmp_path / "run", trainer.engine, {"step": 1, "position": {"epoch": 0, "index": 0}})
    assert not ckpt.step_dirs(tmp_path / "run")
    for lr in (float("nan"), float("inf"), -1.0):
        with pytest.raises(LarsError, match="learning rate"):
            trainer.step(batch, lr)


def test_an_exploding_run_stops_after_the_skipped_steps_and_saves_nothing_non_finite(tiny_bundles, tmp_path,
                                                                                     capsys):
    run = tmp_path / "run"
    code = ort_main(["train", str(tiny_bundles["llama"]), *_cli(_args(run, steps=12, lr=1e30, warmup_steps=0,
                                                                     save_every=1, max_skipped_steps=3))])
    err = capsys.readouterr().err
    assert code == 2, err
    line = [x for x in err.splitlines() if x.startswith("error:")][0]
    assert "NaN or inf 3 times in a row" in line and "lower --lr" in line
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum("skipped" in r for r in records) == 3
    for d in ckpt.step_dirs(run):
        assert ckpt.verify(d)  # every checkpoint written is whole and finite
    code = ort_main(["export-adapter", str(run), "--out", str(tmp_path / "adapter")])
    from safetensors.numpy import load_file
    assert code == 0 and all(np.isfinite(v).all() for v in
                             load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")).values())


def test_divergence_is_judged_from_ln_vocab():
    health = TrainingHealth(vocab_size=1000, patience=3)  # ln 1000 = 6.91
    started = [health.observe(step, loss) for step, loss in enumerate([3.0, 2.8, 6.9, 7.5], 1)]
    assert started == [False, False, True, False]  # step 3's loss shows step 2's adapters diverged
    assert not health.healthy  # nothing is saved while there
    health.raise_if_diverged_too_long("checkpoint step 2 is intact")  # 2 of 3 steps: not yet
    health.observe(5, 7.0)
    with pytest.raises(LarsError, match=r"diverged at step 3: the loss rose from 2.800 to 7.000.*checkpoint step 2"):
        health.raise_if_diverged_too_long("checkpoint step 2 is intact")
    fresh = TrainingHealth(vocab_size=1000, patience=3)  # a random model starts at ln(vocab): nothing to lose
    assert not any(fresh.observe(step, 6.9) for step in range(1, 10)) and fresh.healthy and not fresh.judging
    recovering = TrainingHealth(vocab_size=1000, patience=3)
    for step, loss in enumerate([3.0, 6.9, 6.9, 3.1], 1):
        recovering.observe(step, loss)
    assert recovering.healthy


def test_batch_values_are_checked(tiny_bundles):
    trainer = Trainer(tiny_bundles["llama"], load_eval=False, threads=1)
    for kwargs, needle in ((dict(input_ids=[[1.5, 2.0]]), "must hold integers"),
                           (dict(input_ids=[[True, False]]), "must hold integers"),
                           (dict(input_ids=[[1, 2], [3]]), "rectangular"),
                           (dict(input_ids=[[1, 2, 3]], attention_mask=[[1, 2, 1]]), "attention_mask holds 2"),
                           (dict(input_ids=[[1, 2, 3]], labels=[[1, 2]]), "one shape"),
                           (dict(input_ids=[[1, 2, 3]], labels=[[1, 2, 2**40]]), "label 1099511627776")):
        with pytest.raises(LarsError, match=needle):
            trainer.step(trainer.batch(**kwargs), 1e-3)


def test_a_batch_the_machine_cannot_hold_is_refused_or_warned_before_training(tiny_bundles, tmp_path, capsys,
                                                                              monkeypatch):
    code = ort_main(["train", str(tiny_bundles["llama"]), "--data", str(TRAIN_TEXT), "--out", str(tmp_path / "r"),
                     "--batch-size", "1000000000", "--seq-len", "32", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "for the token arrays alone" in err and "lower --batch-size" in err, err
    assert not (tmp_path / "r" / "run.json").exists()
    from lars_artifacts import load_bundle
    from lars_ort import loop as trainer_module

    bundle = load_bundle(tiny_bundles["llama"])
    assert bundle.manifest.memory_plan.model is not None
    monkeypatch.setattr(trainer_module, "available_memory_bytes", lambda: 64 << 20)  # a 64 MB device
    trainer_module._check_fits_in_memory(bundle, 4, 512)
    assert "is predicted to peak at" in capsys.readouterr().err
