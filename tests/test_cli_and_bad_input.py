"""Each bad input gives a one-line error naming the thing and the fix, exit code 2, and no damaged checkpoint."""

import json
import math
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
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 1, 2]
    code = ort_main(["eval", str(bundle), "--data", str(EVAL_TEXT), "--run", str(run), "--seq-len", "32"])
    result = json.loads(capsys.readouterr().out)
    # the run's latest adapters on the same eval data and length: the loss the run itself logged after its last step
    assert code == 0 and result["eval_loss"] == pytest.approx(evals[-1]["eval_loss"], rel=1e-6), (result, evals)
    assert result["perplexity"] == pytest.approx(math.exp(result["eval_loss"]), rel=1e-6)
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


def _with_config(model_dir, out, **changes):
    """A copy of a model folder whose config.json has `changes` (the check reads the config before any weight)."""
    shutil.copytree(model_dir, out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, **changes}))
    return str(out)


def test_export_errors_name_the_problem(tiny_models, tmp_path):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    dynamic_rope = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    cases = [
        ([str(tmp_path / "gpt2")], "architecture 'gpt2'"),
        ([_with_config(tiny_models["llama"], tmp_path / "dyn", rope_scaling=dynamic_rope,
                       rope_parameters=dynamic_rope)],
         "llama config uses dynamic NTK rope scaling"),
        ([_with_config(tiny_models["gemma3"], tmp_path / "bidi", use_bidirectional_attention=True)],
         "gemma3_text config sets use_bidirectional_attention: lars trains causal decoders"),
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


# --- Options: every value checked before any slow work -----------------------------------------------------------

@pytest.mark.parametrize("values, needle", [
    ({"lr": float("nan")}, "--lr must be a finite number, got nan"),
    ({"lr": float("inf")}, "--lr must be a finite number, got inf"),
    ({"lr": 0.0}, "--lr must be above 0"),
    ({"steps": 2.5}, "--steps must be an integer, got 2.5"),
    ({"batch_size": "3"}, "--batch-size must be an integer, got '3'"),
    ({"seq_len": True}, "--seq-len must be an integer, got True"),
    ({"warmup_steps": -1}, "--warmup-steps must be at least 0"),
    ({"min_lr_ratio": 1.5}, "--min-lr-ratio must be between 0 and 1"),
    ({"min_lr_ratio": -0.1}, "--min-lr-ratio must be between 0 and 1"),
    ({"save_every": -1}, "--save-every must be at least 0"),
    ({"eval_every": -2}, "--eval-every must be at least 0"),
    ({"eval_batches": -1}, "--eval-batches must be at least 0"),
    ({"keep_checkpoints": 0}, "--keep-checkpoints must be at least 1"),
    ({"threads": -1}, "--threads must be between 0"),
    ({"threads": 2**31}, "--threads must be between 0"),
    ({"mmap_threshold_mb": float("nan")}, "--mmap-threshold-mb must be a finite number"),
    ({"mmap_threshold_mb": -1.0}, "--mmap-threshold-mb must be between 0 and 32"),
    ({"mmap_threshold_mb": 10**400}, "--mmap-threshold-mb must be a finite number"),
    ({"seed": -1}, "--seed must be at least 0"),
    ({"seed": 1.0}, "--seed must be an integer"),
    ({"schedule": "cos"}, "--schedule must be one of cosine, linear, constant"),
    ({"backend": "cuda"}, "--backend must be one of auto, ort, ort-training"),
    ({"arena_regions": "power-of-two"}, "--arena-regions must be one of auto, doubling, exact"),
    ({"arena_regions": "exact", "memory_arena": False},
     "--arena-regions exact sets how ORT's arena grows, and --no-memory-arena turns it off; drop one"),
    ({"progress": "no"}, "--progress must be true or false, got 'no'"),
    ({"mask_prompt": 1}, "--mask-prompt must be true or false"),
    ({"data": 5}, "--data must be a string, got 5"),
    ({"eval_data": ["a.txt"]}, "--eval-data must be a string"),
])
def test_training_args_validate_every_field(values, needle):
    from lars_artifacts import LarsError
    from lars_ort.config import TrainingArgs

    with pytest.raises(LarsError, match="^" + needle.replace("(", r"\(")):
        TrainingArgs(**values).validate()


def test_training_args_widen_an_int_to_a_float():
    from lars_ort.config import TrainingArgs

    args = TrainingArgs(lr=1, min_lr_ratio=0, mmap_threshold_mb=2)
    args.validate()
    assert (args.lr, args.min_lr_ratio, args.mmap_threshold_mb) == (1.0, 0.0, 2.0)
    assert all(isinstance(v, float) for v in (args.lr, args.min_lr_ratio, args.mmap_threshold_mb))


def test_trainer_level_users_get_the_same_checks(tiny_bundles, tmp_path):
    from lars_artifacts import LarsError
    from lars_ort.config import TrainingArgs
    from lars_ort.loop import train

    for values, needle in (({"lr": float("nan")}, "--lr"), ({"seed": -5}, "--seed"), ({"steps": "10"}, "--steps")):
        with pytest.raises(LarsError, match=needle):
            train(tiny_bundles["llama"], TrainingArgs(data=str(TRAIN_TEXT), out=str(tmp_path / "r"), **values))
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("flags, needle", [
    (["--lr", "nan"], "--lr must be a finite number, got nan"),
    (["--lr", "inf"], "--lr must be a finite number, got inf"),
    (["--lr=-inf"], "--lr must be a finite number, got -inf"),
    (["--lr", "0"], "--lr must be above 0"),
    (["--seed", "-1"], "--seed must be at least 0"),
    (["--min-lr-ratio", "2"], "--min-lr-ratio must be between 0 and 1"),
    (["--keep-checkpoints", "0"], "--keep-checkpoints must be at least 1"),
    (["--mmap-threshold-mb", "inf"], "--mmap-threshold-mb must be a finite number"),
    (["--threads", "99999999999"], "--threads must be between 0 and 1024"),
])
def test_cli_rejects_bad_numbers(flags, needle, tiny_bundles, capsys, tmp_path):
    one_line_error(*run_ort(capsys, "train", tiny_bundles["llama"], "--data", TRAIN_TEXT, "--out", tmp_path / "r",
                            *TRAIN, *flags), needle)
    assert not (tmp_path / "r").exists()


def test_eval_flags_are_checked(tiny_bundles, capsys):
    for flags, needle in ((["--batch-size", "0"], "--batch-size must be at least 1"),
                          (["--seq-len", "-4"], "--seq-len must be at least 1"),
                          (["--threads", "-1"], "--threads must be between 0")):
        one_line_error(*run_ort(capsys, "eval", tiny_bundles["llama"], "--data", EVAL_TEXT, *flags), needle)


def test_config_file_value_of_the_wrong_type_names_the_file(tiny_bundles, capsys, tmp_path):
    cases = [
        ("train.yaml", "steps: 2.5\n", "config file {}: steps must be an integer, got 2.5"),
        ("train.yaml", "lr: '1e-4'\n", "config file {}: lr must be a number, got '1e-4'"),
        ("train.yml", "progress: 'no'\n", "config file {}: progress must be true or false"),
        ("train.toml", 'batch-size = "4"\n', "config file {}: batch-size must be an integer, got '4'"),
        ("train.toml", "lr = nan\n", "config file {}: lr must be a finite number, got nan"),
        ("train.toml", "seed = -1\n", "config file {}: seed must be at least 0"),
        ("train.json", '{"keep_checkpoints": 0}', "config file {}: keep_checkpoints must be at least 1"),
        ("train.json", '{"min_lr_ratio": true}', "config file {}: min_lr_ratio must be a number, got True"),
        ("train.toml", "[train]\nsteps = 3\n", "config file {}: unknown option 'train' (options go at the top"),
        ("train.yaml", "steps: 3\nsteps: 4\n", "config file {} is not valid YAML: 'steps' is given twice"),
        ("train.json", '{"lr": 0.1, "lr": 0.2}', "config file {} is not valid JSON: 'lr' is given twice"),
        ("train.yaml", "batch-size: 2\nbatch_size: 3\n", "config file {}: batch_size is given twice"),
    ]
    for name, text, needle in cases:
        cfg = tmp_path / name
        cfg.write_text(text)
        one_line_error(*run_ort(capsys, "train", tiny_bundles["llama"], "--data", TRAIN_TEXT, "--out",
                                tmp_path / "r", "--config", cfg), needle.format(cfg))
    assert not (tmp_path / "r").exists()


def test_yaml_exponent_floats_are_numbers(tmp_path):
    """PyYAML (YAML 1.1) reads `lr: 1e-4` as a string; the config loader reads it as YAML 1.2 does."""
    import yaml

    from lars_ort.config import TrainingArgs, load_config_file

    cfg = tmp_path / "train.yaml"
    cfg.write_text("lr: 1e-4\nmin_lr_ratio: 5E-2\nmmap-threshold-mb: 1.5e+0\nsteps: 1_000\nwarmup_steps: 0x10\n")
    values = load_config_file(str(cfg))
    assert values == {"lr": 1e-4, "min_lr_ratio": 0.05, "mmap_threshold_mb": 1.5, "steps": 1000, "warmup_steps": 16}
    TrainingArgs(**values).validate()
    assert yaml.safe_load("lr: 1e-4") == {"lr": "1e-4"}  # PyYAML's own SafeLoader is left as it is
    cfg.write_text("lr: 1\n")
    args = TrainingArgs(**load_config_file(str(cfg)))
    args.validate()
    assert args.lr == 1.0 and isinstance(args.lr, float)


def test_unreadable_config_files(tiny_bundles, capsys, tmp_path):
    garbage = tmp_path / "garbage.toml"
    garbage.write_bytes(bytes(range(256)))
    (tmp_path / "dir.yaml").mkdir()
    cases = [(garbage, "is not valid TOML: it is not UTF-8 text"),
             (tmp_path / "dir.yaml", "is a directory"),
             (tmp_path / "missing.json", "does not exist"),
             (tmp_path / "train.ini", "must end in .toml, .yaml, .yml or .json")]
    (tmp_path / "train.ini").write_text("steps = 3\n")
    for cfg, needle in cases:
        one_line_error(*run_ort(capsys, "train", tiny_bundles["llama"], "--data", TRAIN_TEXT, "--out",
                                tmp_path / "r", "--config", cfg), str(cfg), needle)


# --- Output directories ---------------------------------------------------------------------------------------------

def test_out_that_is_a_file(tiny_bundles, capsys, tmp_path):
    existing = tmp_path / "notes.txt"
    existing.write_text("mine\n")
    one_line_error(*run_ort(capsys, "train", tiny_bundles["llama"], "--data", TRAIN_TEXT, "--out", existing,
                            *TRAIN), f"--out {existing} is a file")
    one_line_error(*run_ort(capsys, "train", tiny_bundles["llama"], "--data", TRAIN_TEXT, "--out",
                            existing / "run", *TRAIN), f"lies under {existing}, which is a file")
    one_line_error(*run_ort(capsys, "export-adapter", tmp_path / "no-run", "--out", existing),
                   f"--out {existing} is a file")
    assert existing.read_text() == "mine\n"


def test_export_adapter_out_that_is_a_file_after_training(tiny_bundles, capsys, tmp_path):
    """The library path (write_peft_adapter) refuses it too, not only the CLI."""
    from lars_artifacts import LarsError, load_bundle
    from lars_ort.peft_adapter import write_peft_adapter

    existing = tmp_path / "adapter"
    existing.write_text("")
    with pytest.raises(LarsError, match="adapter directory .* is a file"):
        write_peft_adapter(load_bundle(tiny_bundles["llama"]), {}, existing)


def test_out_in_a_read_only_directory(tiny_bundles, capsys, tmp_path, monkeypatch):
    import os

    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    if getattr(os, "geteuid", lambda: 1)() == 0:  # root may write anywhere: let os.access answer as for a user
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p) == str(read_only)
                            else real_access(p, mode, **kw))
    try:
        one_line_error(*run_ort(capsys, "train", tiny_bundles["llama"], "--data", TRAIN_TEXT, "--out",
                                read_only / "run", *TRAIN), f"directory {read_only} is not writable")
        one_line_error(*run_ort(capsys, "export-adapter", tmp_path / "no-run", "--out", read_only / "adapter"),
                       f"directory {read_only} is not writable")
    finally:
        read_only.chmod(0o755)


@pytest.mark.parametrize("error, needles", [
    (OSError(28, "No space left on device", "/runs/a/checkpoints/.step-3.tmp"),
     ["/runs/a/checkpoints/.step-3.tmp: No space left on device", "free disk space", "--resume"]),
    (PermissionError(13, "Permission denied", "/runs/a/metrics.jsonl"),
     ["/runs/a/metrics.jsonl: Permission denied", "permissions"]),
    (IsADirectoryError(21, "Is a directory", "/runs/a/run.json"), ["/runs/a/run.json: Is a directory"]),
    (FileExistsError(17, "File exists", "/runs/a"), ["/runs/a: File exists"]),
    (OSError(28, "No space left on device"), ["error: No space left on device; free disk space"]),
])
def test_os_errors_are_one_line(error, needles, capsys, monkeypatch, tmp_path):
    """The safety net for what no check foresaw: a full disk or a permission changed mid-run."""
    from lars_ort import commands, loop

    def failing(*args, **kwargs):
        raise error

    monkeypatch.setattr(loop, "train", failing)
    monkeypatch.setattr(commands, "export_run_adapter", failing)
    one_line_error(*run_ort(capsys, "train", tmp_path / "b", "--data", TRAIN_TEXT, "--out", tmp_path / "r"), *needles)
    one_line_error(*run_ort(capsys, "export-adapter", tmp_path / "r", "--out", tmp_path / "a"), *needles)


def test_an_export_that_fills_the_disk_says_so_in_one_line(capsys, monkeypatch, tmp_path):
    from lars_export import cli, pipeline

    def full_disk(config):
        raise OSError(28, "No space left on device", str(tmp_path / "o" / "weights.onnx_data"))

    monkeypatch.setattr(pipeline, "run", full_disk)
    code = cli.main(["--out", str(tmp_path / "o")])
    one_line_error(code, capsys.readouterr().err, f"{tmp_path / 'o' / 'weights.onnx_data'}: No space left on device",
                   "free disk space and export again")


# --- Windows: lars_artifacts.measure without `resource` ----------------------------------------------------------

def test_metrics_import_without_the_resource_module():
    code = ("import sys; sys.modules['resource'] = None\n"
            "import lars_artifacts.measure as m\n"
            "peak = m.peak_rss_mb()\n"
            "assert isinstance(peak, float) and peak > 0, peak\n"
            "sys.modules.pop('lars_artifacts.measure')\n"
            "real_open = open\n"
            "import builtins; builtins.open = lambda *a, **k: (_ for _ in ()).throw(OSError('no /proc'))\n"
            "import lars_artifacts.measure as m\n"
            "assert m.peak_rss_mb() == 0.0\n"  # neither /proc nor resource: unknown, not a crash
            "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_windows_peak_working_set_reads_process_memory_counters(monkeypatch):
    """GetProcessMemoryInfo stood in for by a fake kernel32: the structure and the call as Windows would see them."""
    import ctypes
    import types
    from ctypes import wintypes

    from lars_artifacts import measure as metrics

    def get_current_process():
        return -1

    def get_process_memory_info(handle, counters_ref, size):
        counters = counters_ref._obj
        # two DWORDs and eight SIZE_Ts: 72 bytes on 64-bit Windows (DWORD is a c_ulong, 8 bytes, off Windows)
        assert handle == -1 and size == ctypes.sizeof(counters) == counters.cb == (
            2 * ctypes.sizeof(wintypes.DWORD) + 8 * ctypes.sizeof(ctypes.c_size_t))
        counters.PeakWorkingSetSize = 300 * 2**20
        return 1

    # plain functions, so the code under test can set argtypes / restype on them as on ctypes functions
    kernel32 = types.SimpleNamespace(GetCurrentProcess=get_current_process,
                                     K32GetProcessMemoryInfo=get_process_memory_info)
    monkeypatch.setattr(ctypes, "WinDLL", lambda name: kernel32, raising=False)
    assert metrics._windows_peak_working_set() == 300 * 2**20


# --- Manifest -----------------------------------------------------------------------------------------------------

def _edit_manifest(bundle, edit):
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("edit, needles", [
    (lambda m: m["files"]["checkpoint"].pop("bytes"), ["files entry 'checkpoint' lacks 'bytes'", "re-export"]),
    (lambda m: m["files"]["tokenizer.json"].pop("sha256"), ["files entry 'tokenizer.json' lacks 'sha256'",
                                                            "re-export"]),
    (lambda m: m["files"]["checkpoint"].update(bytes="12"), ["files entry 'checkpoint' has bytes '12'"]),
    (lambda m: m["files"]["checkpoint"].update(sha256=None), ["files entry 'checkpoint' has sha256 None"]),
    (lambda m: m.update(files=list(m["files"])), ["files must be an object, got list", "re-export"]),
    (lambda m: m["files"].update({"../../etc/passwd": m["files"]["checkpoint"]}),
     ["files entry '../../etc/passwd' is not a file name"]),
    (lambda m: m.pop("architecture"), ["lacks architecture", "re-export"]),
    (lambda m: m.update(adapter=[]), ["adapter must be an object, got list"]),
    (lambda m: m.update(format_version="2"), ["format version 2"]),
    (lambda m: m["architecture"].pop("vocab_size"), ["architecture.vocab_size must be a positive integer"]),
    (lambda m: m["adapter"]["parameters"][0].pop("peft_key"), ["adapter.parameters[0].peft_key must be a string"]),
    (lambda m: m["adapter"]["parameters"][1].update(shape=[4, "64"]), ["adapter.parameters[1].shape must be a list"]),
    # the plain-onnxruntime backend's models (lars_artifacts.schema.OrtStep), checked at load, not mid-run
    (lambda m: m["models"]["ort"].pop("loss"), ["models.ort.loss must be a string, got nothing", "re-export"]),
    (lambda m: m["models"]["ort"].update(gradients=[]), ["models.ort.gradients must be an object, got list"]),
    (lambda m: m["models"]["ort"]["optimizer"].update(name="sgd"), ["models.ort.optimizer is 'sgd'", "adamw"]),
    (lambda m: m["models"]["ort"]["zo"].pop("losses"), ["models.ort.zo names zo_step.onnx but not its losses"]),
    # the weights file's index, which the runtime maps without a copy (lars_artifacts.schema.WeightTensor)
    (lambda m: m["weights"]["tensors"][0].update(dtype="float33"), ["weights.tensors[0]", "'float33' is not a numpy"]),
    (lambda m: m["weights"]["tensors"][1].update(length=12), ["weights.tensors[1]", "length 12 is not its shape"]),
    (lambda m: m["weights"]["tensors"][2].update(offset=-8), ["weights.tensors[2]", "offset must be an integer >= 0"]),
    # the graphs' interface, the special tokens and the memory plan (GraphIo, SpecialTokens, MemoryPlan)
    (lambda m: m["io"].pop("training_outputs"), ["io.training_outputs must be a list, got nothing"]),
    (lambda m: m["io"].update(ignore_index="-100"), ["io.ignore_index must be an integer, got str"]),
    (lambda m: m["tokens"].update(eos_token_id=-1), ["tokens.eos_token_id must be an integer >= 0 or null, got -1"]),
    (lambda m: m["tokens"].update(bos_token=1), ["tokens.bos_token must be a string, got int"]),
    (lambda m: m.update(tokens=[]), ["tokens must be an object, got list"]),
    (lambda m: m["memory"]["model"].update(saved_per_token="1e5"), ["memory.model.saved_per_token must be a number"]),
    (lambda m: m["memory"]["model"].pop("weights"), ["memory.model.weights must be a number, got None"]),
    (lambda m: m["memory"].update(budget_bytes=1.5), ["memory.budget_bytes must be an integer >= 0 or null, got 1.5"]),
    (lambda m: m["memory"].update(arena_regions="power-of-two"),
     ["memory.arena_regions must be one of doubling, exact, got 'power-of-two'"]),
])
def test_malformed_manifest(edit, needles, bundle_copy, capsys, tmp_path):
    _edit_manifest(bundle_copy, edit)
    one_line_error(*run_ort(capsys, "train", bundle_copy, "--data", TRAIN_TEXT, "--out", tmp_path / "r", *TRAIN),
                   "manifest.json", *needles)
    assert not (tmp_path / "r").exists()


def test_edited_manifest_fails_its_own_sha256(bundle_copy, capsys, tmp_path):
    def grow_an_adapter(m):
        m["adapter"]["parameters"][0]["shape"][0] += 1

    _edit_manifest(bundle_copy, grow_an_adapter)
    one_line_error(*run_ort(capsys, "train", bundle_copy, "--data", TRAIN_TEXT, "--out", tmp_path / "r", *TRAIN),
                   "manifest.json", "manifest_sha256", "re-export")
    assert not (tmp_path / "r").exists()


def test_manifest_without_its_sha256_still_loads(bundle_copy):
    """Bundles written before manifest_sha256 existed load as before; the layout of the JSON does not matter."""
    from lars_artifacts import load_bundle

    assert load_bundle(bundle_copy).manifest.manifest_sha256
    _edit_manifest(bundle_copy, lambda m: None)  # rewritten without indentation: same content, same hash
    load_bundle(bundle_copy)
    _edit_manifest(bundle_copy, lambda m: m.pop("manifest_sha256"))
    assert load_bundle(bundle_copy).manifest.manifest_sha256 == ""


def test_the_old_eval_keyword_still_works_with_a_deprecation_warning(tiny_bundles):
    from lars_ort import Trainer

    with pytest.warns(DeprecationWarning, match=r"Trainer\(eval=\.\.\.\) is deprecated; pass load_eval="):
        trainer = Trainer(tiny_bundles["llama"], eval=False)
    assert trainer.engine.eval_session is None and not trainer.engine.has_eval
    assert Trainer(tiny_bundles["llama"]).engine.has_eval


def test_the_exporter_writes_exactly_the_typed_manifest_schema(bundle_copy):
    """lars_artifacts.schema is the one definition of the models.ort entry and the adapter parameters: what the
    exporter wrote reads back into those types and writes out unchanged (no key the types do not know)."""
    from lars_artifacts import AdapterParameter, OrtStep, ZoModels, load_bundle

    manifest = load_bundle(bundle_copy).manifest
    step = manifest.ort_step
    assert isinstance(step, OrtStep) and isinstance(step.zo, ZoModels) and step.zo.forward == "zo_forward.onnx"
    assert step.to_dict() == manifest.models["ort"]
    assert set(step.gradients) == {p.onnx_name for p in manifest.adapter_parameters}
    assert all(isinstance(p, AdapterParameter) for p in manifest.adapter_parameters)
    assert [p.to_dict() for p in manifest.adapter_parameters] == manifest.adapter["parameters"]
    assert [t.to_dict() for t in manifest.weight_tensors] == manifest.weights["tensors"] != []
