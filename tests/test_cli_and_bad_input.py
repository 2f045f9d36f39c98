"""Each bad input gives a one-line error naming the thing and the fix, exit code 2, and no damaged checkpoint."""

import json
import shutil
import subprocess
import sys

import pytest

from lars_ort.cli import main as ort_main
from tiny import EVAL_TEXT, TRAIN_TEXT


def run_ort(capsys, *argv):
    code = ort_main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.err


def one_line_error(code, err, *needles):
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def bundle_copy(tiny_bundles, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundles["llama"], dst)
    return dst


TRAIN = ["--steps", "2", "--batch-size", "2", "--seq-len", "32", "--no-progress", "--threads", "1"]


def test_train_eval_export_adapter_through_the_cli(tiny_bundles, tmp_path, capsys):
    bundle, run = tiny_bundles["llama"], tmp_path / "run"
    code, err = run_ort(capsys, "train", bundle, "--data", TRAIN_TEXT, "--out", run, "--eval-data", EVAL_TEXT,
                        "--eval-every", "1", *TRAIN)
    assert code == 0, err
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 1, 2]
    code = ort_main(["eval", str(bundle), "--data", str(EVAL_TEXT), "--run", str(run), "--seq-len", "32"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["eval_loss"] > 0 and result["perplexity"] > 1
    code, err = run_ort(capsys, "export-adapter", run, "--out", tmp_path / "adapter")
    assert code == 0, err
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["task_type"] == "CAUSAL_LM"


def test_config_file_with_flag_override(tiny_bundles, tmp_path, capsys):
    cfg = tmp_path / "train.yaml"
    cfg.write_text(f"data: {TRAIN_TEXT}\nsteps: 3\nbatch-size: 2\nseq_len: 16\nprogress: false\n")
    code, err = run_ort(capsys, "train", tiny_bundles["llama"], "--config", cfg, "--out", tmp_path / "r",
                        "--steps", "1")
    assert code == 0, err
    args = json.loads((tmp_path / "r" / "run.json").read_text())["args"]
    assert args["steps"] == 1 and args["seq_len"] == 16 and args["batch_size"] == 2
    toml = tmp_path / "train.toml"
    toml.write_text("stepz = 3\n")
    one_line_error(*run_ort(capsys, "train", tiny_bundles["llama"], "--config", toml, "--out", tmp_path / "q"),
                   "unknown option 'stepz'")


def test_missing_bundle(capsys, tmp_path):
    one_line_error(*run_ort(capsys, "train", tmp_path / "nope", "--data", TRAIN_TEXT, "--out", tmp_path / "r"),
                   "does not exist", "lars-export")


def test_missing_bundle_file(bundle_copy, capsys, tmp_path):
    (bundle_copy / "eval_model.onnx").unlink()
    one_line_error(*run_ort(capsys, "train", bundle_copy, "--data", TRAIN_TEXT, "--out", tmp_path / "r"),
                   "eval_model.onnx is missing")


def test_corrupt_bundle_file(bundle_copy, capsys, tmp_path):
    data = bytearray((bundle_copy / "checkpoint").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bundle_copy / "checkpoint").write_bytes(bytes(data))
    one_line_error(*run_ort(capsys, "train", bundle_copy, "--data", TRAIN_TEXT, "--out", tmp_path / "r"),
                   "checkpoint", "sha256", "re-export")


def test_manifest_of_another_format_version(bundle_copy, capsys, tmp_path):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["format_version"] = 99
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    one_line_error(*run_ort(capsys, "train", bundle_copy, "--data", TRAIN_TEXT, "--out", tmp_path / "r"),
                   "format version 99", "re-export")


def test_empty_data(tiny_bundles, capsys, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    one_line_error(*run_ort(capsys, "train", tiny_bundles["llama"], "--data", empty, "--out", tmp_path / "r"),
                   "empty.txt", "no trainable tokens")


def test_malformed_jsonl_line_is_named(tiny_bundles, capsys, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello"}\n{"text": "world"}\n{"text": oops}\n')
    one_line_error(*run_ort(capsys, "train", tiny_bundles["llama"], "--data", data, "--out", tmp_path / "r"),
                   "d.jsonl line 3", "not valid JSON")
    data.write_text('{"text": "hello"}\n{"question": "?"}\n')
    one_line_error(*run_ort(capsys, "train", tiny_bundles["llama"], "--data", data, "--out", tmp_path / "r"),
                   "line 2", "not a known format")


def test_token_ids_beyond_vocabulary(tiny_bundles, capsys, tmp_path):
    data = tmp_path / "ids.jsonl"
    data.write_text(json.dumps({"input_ids": [1, 2, 3, 99999]}) + "\n")
    one_line_error(*run_ort(capsys, "train", tiny_bundles["llama"], "--data", data, "--out", tmp_path / "r"),
                   "token id 99999", "vocabulary")


def test_sequence_longer_than_context(tiny_bundles, capsys, tmp_path):
    one_line_error(*run_ort(capsys, "train", tiny_bundles["llama"], "--data", TRAIN_TEXT, "--out", tmp_path / "r",
                            "--seq-len", "4096"), "4096", "context of 512")


def test_run_of_another_bundle_and_existing_checkpoint_untouched(tiny_bundles, capsys, tmp_path):
    run = tmp_path / "run"
    code, err = run_ort(capsys, "train", tiny_bundles["llama"], "--data", TRAIN_TEXT, "--out", run, *TRAIN)
    assert code == 0, err
    saved = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "metrics.jsonl"}
    one_line_error(*run_ort(capsys, "train", tiny_bundles["qwen2"], "--data", TRAIN_TEXT, "--out", run, "--resume",
                            *TRAIN), "belongs to bundle")
    one_line_error(*run_ort(capsys, "train", tiny_bundles["llama"], "--data", TRAIN_TEXT, "--out", run, *TRAIN),
                   "already holds a run", "--resume")
    one_line_error(*run_ort(capsys, "export-adapter", run, "--out", tmp_path / "a", "--bundle",
                            tiny_bundles["qwen2"]), "belongs to bundle")
    assert saved == {p: p.read_bytes() for p in saved}


def test_export_budget_errors_name_the_problem(tiny_models, tmp_path):
    model = str(tiny_models["llama"])
    cases = [
        (["--memory-budget", "2GB"], "--memory-budget needs --max-seq-len"),
        (["--memory-budget", "two gigs", "--max-seq-len", "512"], "--memory-budget 'two gigs' is not a size"),
        (["--memory-budget", "100MB", "--max-seq-len", "512"], "nothing fits 100MB at 512 tokens"),
        (["--memory-budget", "2GB", "--max-seq-len", "100000"], "exceeds the model's context of 512 tokens"),
    ]
    for flags, needle in cases:
        proc = subprocess.run([sys.executable, "-m", "lars_export.cli", model, *flags, "--out", str(tmp_path / "o")],
                              capture_output=True, text=True)
        one_line_error(proc.returncode, proc.stderr, needle)
    assert not (tmp_path / "o").exists()


def test_export_errors_name_the_problem(tmp_path):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    cases = [
        ([str(tmp_path / "gpt2")], "architecture 'gpt2'"),
        ([str(tmp_path / "missing.gguf")], "does not exist"),
        ([str(tmp_path)], "without config.json"),
    ]
    for argv, needle in cases:
        proc = subprocess.run([sys.executable, "-m", "lars_export.cli", *argv, "--out", str(tmp_path / "o")],
                              capture_output=True, text=True)
        one_line_error(proc.returncode, proc.stderr, needle)
    assert not (tmp_path / "o").exists()
    del torch


def test_damaged_run_checkpoint_is_an_error_not_a_crash(tiny_bundles, capsys, tmp_path):
    """ORT's own loader segfaults on a zeroed checkpoint; the plain backend reads ORT's format itself and says so."""
    run = tmp_path / "run"
    code, err = run_ort(capsys, "train", tiny_bundles["llama"], "--data", TRAIN_TEXT, "--out", run, *TRAIN)
    assert code == 0, err
    checkpoint = run / "checkpoints" / (run / "latest").read_text().strip() / "checkpoint"
    data = bytearray(checkpoint.read_bytes())
    data[len(data) // 4: len(data) // 2] = bytes(len(data) // 2 - len(data) // 4)
    checkpoint.write_bytes(bytes(data))
    for argv in (["train", tiny_bundles["llama"], "--data", TRAIN_TEXT, "--out", run, "--resume",
                  "--steps", "4", "--batch-size", "2", "--seq-len", "32", "--no-progress"],
                 ["eval", tiny_bundles["llama"], "--data", EVAL_TEXT, "--run", run, "--seq-len", "32"],
                 ["export-adapter", run, "--out", tmp_path / "adapter"]):
        one_line_error(*run_ort(capsys, *argv), str(checkpoint))
