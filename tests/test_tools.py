"""Smoke tests: each benchmark runs end to end on a tiny model and writes its table, JSON and plot."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_bench_memory_on_a_tiny_model(tiny_models, tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "tools" / "bench_memory.py"), "--model", str(tiny_models["llama"]),
                          "--seq-lens", "16,32", "--steps", "1", "--cache", str(tmp_path / "cache"),
                          "--modes", "peft,ort-lora,ort-lora@reuse,lars,lars-random,recompute,chunked-loss,default,"
                                     "attn-chunks,full,stack-rows,floor,default:ort-training",
                          "--json", str(tmp_path / "m.json"), "--plot", str(tmp_path / "m.png")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    rows = json.loads((tmp_path / "m.json").read_text())
    modes = ("peft", "ort-lora", "ort-lora@reuse", "lars", "lars-random", "recompute", "chunked-loss", "default",
             "attn-chunks", "full", "stack-rows", "floor", "default:ort-training")
    assert {(r["mode"], r["seq_len"]) for r in rows} == {(m, s) for m in modes for s in (16, 32)}
    backends = {r["mode"]: r.get("backend") for r in rows}
    assert backends["default"] == "ort" and backends["default:ort-training"] == "ort-training"
    assert all(r["status"] == "ok" and r["peak_rss_mb"] > 0 and r["step_s"] > 0 for r in rows), rows
    # Sampled resident memory splits into anonymous and file-backed, never above the high-water mark.
    assert all(0 < r["anon_peak_mb"] <= r["peak_rss_mb"] + 1 and 0 < r["file_at_peak_mb"] < r["peak_rss_mb"]
               for r in rows), rows
    assert "| ort-lora | 32 |" in out.stdout and "memory slope" in out.stdout
    assert (tmp_path / "m.png").stat().st_size > 0
    # The rows record what the memory model needs, and the validator reads them back.
    assert rows[0]["arch"]["hidden_size"] == 64 and rows[0]["targets"] == "q,k,v,o,gate,up,down"
    # the tiny llama's tied table is stored once in every bundle (the memory model counts it once for these rows)
    assert rows[0]["arch"]["tie_word_embeddings"]
    assert {r["tied_table_once"] for r in rows if r["bundle"]} == {True}
    check = subprocess.run([sys.executable, str(REPO / "tools" / "validate_memory_model.py"), str(tmp_path / "m.json")],
                           capture_output=True, text=True, timeout=600)
    assert check.returncode == 0, check.stderr
    assert "| full | 32 |" in check.stdout and "predicted / measured from" in check.stdout


def test_bench_memory_measures_one_cold_step_and_the_validator_reads_exact_regions(tiny_models, tmp_path):
    def bench(*args):
        return subprocess.run([sys.executable, str(REPO / "tools" / "bench_memory.py"), "--model",
                               str(tiny_models["llama"]), "--seq-lens", "16", "--cache", str(tmp_path / "cache"),
                               *args], capture_output=True, text=True, timeout=600)

    bad = bench("--modes", "full", "--steps", "-1")
    assert bad.returncode != 0 and "--steps must be at least 0, got -1" in bad.stderr
    out = bench("--modes", "full,full@exact", "--steps", "0", "--json", str(tmp_path / "m.json"))
    assert out.returncode == 0, out.stderr
    rows = json.loads((tmp_path / "m.json").read_text())
    assert [(r["mode"], r["status"]) for r in rows] == [("full", "ok"), ("full@exact", "ok")]
    assert all(r["step_s"] > 0 and r["peak_rss_mb"] > 0 for r in rows)
    check = subprocess.run([sys.executable, str(REPO / "tools" / "validate_memory_model.py"), str(tmp_path / "m.json")],
                           capture_output=True, text=True, timeout=600)
    assert check.returncode == 0, check.stderr
    assert "| full | 16 |" in check.stdout and "| full@exact | 16 |" in check.stdout  # the budget's arena setting


def test_bench_memory_runs_a_baseline_bundle_beside_this_exporters(tiny_models, tmp_path):
    """MODE~base runs the bundle an earlier exporter left in --baseline-cache (never one exported now)."""
    def bench(*args):
        return subprocess.run([sys.executable, str(REPO / "tools" / "bench_memory.py"), "--model",
                               str(tiny_models["llama"]), "--seq-lens", "16", "--steps", "1", *args],
                              capture_output=True, text=True, timeout=600)

    old, new = tmp_path / "old", tmp_path / "new"
    assert bench("--modes", "default", "--cache", str(old)).returncode == 0
    out = bench("--modes", "default~base,default", "--cache", str(new), "--baseline-cache", str(old),
                "--json", str(tmp_path / "m.json"))
    assert out.returncode == 0, out.stderr
    rows = {r["mode"]: r for r in json.loads((tmp_path / "m.json").read_text())}
    assert rows["default~base"]["bundle"].startswith(str(old)) and rows["default"]["bundle"].startswith(str(new))
    assert all(r["status"] == "ok" for r in rows.values())
    missing = bench("--modes", "lars~base", "--cache", str(new), "--baseline-cache", str(old))
    assert missing.returncode != 0
    assert "has no bundle-lars-r8" in missing.stderr and "earlier exporter" in missing.stderr
    assert "need --baseline-cache" in bench("--modes", "default~base", "--cache", str(new)).stderr


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


def test_memory_breakdown_counts_what_each_pass_frees(tiny_models, tmp_path):
    """The saved-tensor table of exact LoRA, LARS and attention recompute bundles of the tiny Llama (2 layers,
    4 heads, hidden 64, MLP 128): exact sizes where the arithmetic is simple."""
    from lars_export import ExportConfig, export

    bundles = {name: export(ExportConfig(model=str(tiny_models["llama"]), out=str(tmp_path / name), lora_rank=4,
                                         lora_alpha=8, **kw))
               for name, kw in {"exact": dict(lars_basis="none", recompute_attention=False, attention_row_chunks=0),
                                "lars": dict(lars_basis="random", lars_rank=8, recompute_attention=False,
                                             attention_row_chunks=0),
                                "recompute": dict(lars_basis="none", attention_row_chunks=0)}.items()}
    out = subprocess.run([sys.executable, str(REPO / "tools" / "memory_breakdown.py"), *map(str, bundles.values()),
                          "--seq-lens", "64,128", "--json", str(tmp_path / "b.json")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    exact, lars, recompute = (r["rows"] for r in json.loads((tmp_path / "b.json").read_text()))
    mb = lambda floats: floats * 4 / 2**20  # noqa: E731
    probs = "attention probabilities (T²)"
    assert exact[probs]["128"] == pytest.approx(mb(2 * 4 * 128 * 128))  # layers x heads x T²
    assert probs not in recompute
    # Per layer the adapters read 4 distinct inputs: attention in (64), o_proj in (64), MLP in (64), down in (128).
    assert exact["adapter inputs x"]["128"] == pytest.approx(mb(2 * 128 * (64 + 64 + 64 + 128)))
    assert "adapter inputs x" not in lars
    assert lars["LARS projections x·P"]["128"] == pytest.approx(mb(2 * 4 * 128 * 8))
    assert "| attention probabilities (T²) | 2 |" in out.stdout


def test_alloc_trace_finds_the_peak_and_what_is_alive_there(tiny_models, tmp_path):
    mb = 2**20
    mark = "lars-alloc-trace-step-start"  # the marker file alloc_trace's traced step opens when the step begins
    assert f'MARK = "{mark}"' in (REPO / "tools" / "alloc_trace.py").read_text()
    lines = [f'1 mmap(NULL, {5 * mb}, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0) = 0xa',  # before
             f'1 openat(AT_FDCWD, "/tmp/x/{mark}", O_RDONLY|O_CLOEXEC) = 3',
             f'1 mmap(NULL, {2 * mb}, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0) = 0xb',
             f'2 mmap(NULL, {3 * mb}, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0) = 0xc',
             f'1 munmap(0xb, {2 * mb}) = 0',
             f'1 mmap(NULL, {mb // 2}, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0) = 0xd',  # small
             f'1 munmap(0xc, {3 * mb}) = 0']
    (tmp_path / "trace.txt").write_text("\n".join(lines) + "\n")
    done = subprocess.run([sys.executable, str(REPO / "tools" / "alloc_trace.py"), "--trace",
                           str(tmp_path / "trace.txt"), "--json", str(tmp_path / "trace.json")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "trace.json").read_text())
    assert result["start_mb"] == 5 and result["peak_mb"] == 10
    assert result["alive_by_size"] == {str(2 * mb): 1, str(3 * mb): 1}
    assert result["before_peak"] == ["+2", "+3"]

    from lars_export import ExportConfig, export

    # attention whole: its [heads, T, T] tensors are the tiny model's only ones of 1 MB (the mapping threshold)
    bundle = export(ExportConfig(model=str(tiny_models["llama"]), out=str(tmp_path / "b"), lora_rank=4,
                                 lora_alpha=8, attention_row_chunks=0))
    out = subprocess.run([sys.executable, str(REPO / "tools" / "alloc_trace.py"), str(bundle), "--seq-len", "256",
                          "--runtime-python", sys.executable], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    peak = float(out.stdout.split("at its peak ")[1].split(" MB")[0].replace(",", ""))
    assert peak > 0 and "allocated during the step and alive at the peak" in out.stdout


def test_chaos_kills_damages_resumes_and_compares_bit_for_bit(tiny_bundles, tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "tools" / "chaos.py"), "--bundle", str(tiny_bundles["llama"]),
                          "--data", str(REPO / "tests" / "data" / "hamlet_act1.txt"), "--kills", "4", "--damages", "3",
                          "--steps", "40", "--seq-len", "32", "--batch-size", "2", "--save-every", "3",
                          "--json", str(tmp_path / "chaos.json")], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    counts = json.loads((tmp_path / "chaos.json").read_text())["counts"]
    assert counts["trials"] == 7 and counts["kills"] == 4 and counts["damages"] == 3
    assert counts["resumable"] == 7 and counts["stuck"] == 0 and counts["bit_identical"] == 7
    assert counts["with_duplicate_steps"] == 0
    assert "| 7 | 4 | 3 | 7 | 0 | 7 | 0 |" in out.stdout


def test_bench_data_memory_on_small_files(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "tools" / "bench_data_memory.py"), "--mb", "2", "--batches", "2",
                          "--seq-len", "64", "--cache", str(tmp_path / "cache"), "--json", str(tmp_path / "d.json")],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    rows = json.loads((tmp_path / "d.json").read_text())
    assert {r["file"] for r in rows} >= {"data-1mb.jsonl", "data-2mb.jsonl", "data-1mb.txt", "data-2mb.txt"}, rows
    assert all(r["tokens"] > 0 and r["peak_rss_mb"] > 0 for r in rows)


def test_profile_step_splits_kernel_time_by_op_and_direction(tiny_bundles, tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "tools" / "profile_step.py"), str(tiny_bundles["llama"]),
                          "--seq-len", "32", "--steps", "2", "--threads", "1", "--nodes", "5",
                          "--json", str(tmp_path / "p.json")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "p.json").read_text())
    ops = {r["op"]: r for r in result["ops"]}
    assert result["forward_ms"] > 0 and result["backward_ms"] > 0
    assert result["unmatched_ms"] <= 0.05 * result["kernel_ms"]
    assert abs(sum(r["ms"] for r in result["ops"]) - result["kernel_ms"]) < 1e-6 * max(1.0, result["kernel_ms"])
    assert ops["Gather"]["forward_ms"] > 0  # the embedding lookup only runs forward
    assert result["minor_faults"] >= 0 and result["user_s"] >= 0 and result["peak_rss_mb"] > 0
    assert result["graph_nodes"] > 100 and result["session_anon_mb"] > 0 and "graph nodes, +" in out.stdout
    assert "| op type | ms / step |" in out.stdout
    # node kinds fold the layer numbers: every layer's q projection is one kind, and the kinds add up to the total
    kinds = result["node_kinds"]
    assert abs(sum(k["ms"] for k in kinds) - result["kernel_ms"]) < 1e-6 * max(1.0, result["kernel_ms"])
    assert not any(ch.isdigit() for k in kinds for ch in k["kind"])
    manifest = json.loads((Path(tiny_bundles["llama"]) / "manifest.json").read_text())
    layers = manifest["architecture"]["num_hidden_layers"]
    assert max(k["count"] for k in kinds) >= layers
    assert "| node kind | op | side |" in out.stdout


def test_bench_allocator_runs_each_setting_in_its_own_process(tiny_bundles, tmp_path):
    """The allocator only moves memory: every setting computes the same loss, bit for bit."""
    settings = ["malloc", "malloc-hugetlb", "arena", "arena-kept", "arena-shared", "arena-nospin"]
    out = subprocess.run([sys.executable, str(REPO / "tools" / "bench_allocator.py"), str(tiny_bundles["llama"]),
                          "--seq-len", "32", "--steps", "2", "--threads", "1", "--settings", ",".join(settings),
                          "--json", str(tmp_path / "a.json")], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = json.loads((tmp_path / "a.json").read_text())
    assert [r["setting"] for r in rows] == settings
    assert len({r["loss"] for r in rows}) == 1
    assert all(r["peak_rss_mb"] >= r["rss_after_mb"] > 0 and r["wall_s"] > 0 for r in rows)
    assert all(0 < r["rss_file_mb"] <= r["rss_after_mb"] for r in rows)  # the bundle's weights are mapped
    assert "| arena-kept | 32 |" in out.stdout
    # --steps 0 (a large model's step is long): the first step is measured, no warm-up; the same loss
    once = subprocess.run([sys.executable, str(REPO / "tools" / "bench_allocator.py"), str(tiny_bundles["llama"]),
                           "--seq-len", "32", "--steps", "0", "--threads", "1", "--settings", "arena",
                           "--json", str(tmp_path / "once.json")], capture_output=True, text=True, timeout=900)
    assert once.returncode == 0, once.stdout + once.stderr
    (row,) = json.loads((tmp_path / "once.json").read_text())
    assert row["loss"] == rows[0]["loss"] and row["minor_faults"] > rows[2]["minor_faults"]  # a cold step faults more


def test_bench_export_on_a_tiny_model(tiny_models, tmp_path):
    """Every phase of the exporter's report is read back: times, its peak and the gradient builder's (child) peak."""
    out = subprocess.run([sys.executable, str(REPO / "tools" / "bench_export.py"), "--models", str(tiny_models["qwen2"]),
                          "--export-args", "--lora-rank 4 --lars-rank 8", "--cache", str(tmp_path / "cache"),
                          "--json", str(tmp_path / "e.json"), "--plot", str(tmp_path / "e.png")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    (row,) = json.loads((tmp_path / "e.json").read_text())
    assert row["model"] == "qwen2" and row["exit_code"] == 0
    assert [p["phase"].split()[0] for p in row["phases"]] == ["loading", "LARS", "exporting", "checking", "generating",
                                                               "lowering", "writing"]
    assert all(p["seconds"] >= 0 and p["peak_rss_mb"] > 100 for p in row["phases"])
    # the child's peak appears once the gradient builder has run, and it is the child's own (a fresh process with
    # onnxruntime-training and torch imported: more than 100 MB)
    assert [p["child_peak_rss_mb"] is not None for p in row["phases"]] == [False] * 4 + [True] * 3
    assert 100 < row["child_peak_rss_mb"] and row["parameters"] > 0 and row["peak_rss_mb"] > 0
    assert not (tmp_path / "cache" / "bundle-qwen2").exists()  # removed unless --keep-bundles
    assert "| qwen2 |" in out.stdout and (tmp_path / "e.png").stat().st_size > 0


def test_write_gguf_round_trips_through_the_exporters_gguf_loader(tiny_models, tmp_path):
    """A folder written as GGUF loads back through `lars-export`'s GGUF path with the same weights: float32 blocks give
    the same logits bit for bit (Llama's permuted q/k rows undone by transformers' reader, a tied and an untied head);
    Q8_0 blocks within their rounding; a config the GGUF cannot carry is refused by name."""
    import torch

    from lars_export import load

    def logits(source):
        model = load.load_model(source, load.load_config(source))
        with torch.no_grad():
            return model(torch.arange(1, 33).reshape(1, 32)).logits

    qwen2 = tmp_path / "qwen2"  # the tiny qwen2 with Qwen2.5's rope theta: the GGUF must carry it
    shutil.copytree(tiny_models["qwen2"], qwen2)
    config = json.loads((qwen2 / "config.json").read_text())
    config["rope_parameters"]["rope_theta"] = 1e6
    (qwen2 / "config.json").write_text(json.dumps(config))
    folders = {"llama": tiny_models["llama"], "qwen2": qwen2}
    for arch in ("llama", "qwen2"):  # the tiny llama has a tied head, the tiny qwen2 an untied one
        reference = logits(load.resolve(str(folders[arch])))
        for qtype, tolerance in (("f32", 0.0), ("q8_0", 0.05)):
            path = tmp_path / f"{arch}-{qtype}.gguf"
            out = subprocess.run([sys.executable, str(REPO / "tools" / "write_gguf.py"), str(folders[arch]),
                                  str(path), "--type", qtype], capture_output=True, text=True, timeout=300)
            assert out.returncode == 0, out.stderr
            assert f"wrote {path}" in out.stdout
            got = logits(load.resolve(str(path)))
            diff = float((got - reference).abs().max())
            assert diff <= tolerance, (arch, qtype, diff)
            if qtype == "q8_0":
                assert diff > 0  # really quantized
    out = subprocess.run([sys.executable, str(REPO / "tools" / "write_gguf.py"), str(tiny_models["llama3"]),
                          str(tmp_path / "l3.gguf")], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "rope scaling" in out.stderr and not (tmp_path / "l3.gguf").exists()


def test_tests_and_the_library_run_tools_as_programs_never_import_them():
    """tools/ imports the library; nothing imports tools/ (tests run each tool as its users do: a process)."""
    import ast

    tools = {p.stem for p in (REPO / "tools").glob("*.py")}
    offenders = []
    for folder in ("tests", "export", "runtime", "artifacts"):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
                offenders += [f"{path.relative_to(REPO)}: {n}" for n in names if n.split(".")[0] in tools]
    assert offenders == []
    assert "bench_memory" in tools and "federated_demo" in tools  # the check sees the tools


def test_bench_basis_times_both_solvers_on_the_same_activations(tiny_models, tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "tools" / "bench_basis.py"), str(tiny_models["qwen2"]),
                          "--json", str(tmp_path / "b.json"), "--plot", str(tmp_path / "b.png")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    got = json.loads((tmp_path / "b.json").read_text())
    config = json.loads((tiny_models["qwen2"] / "config.json").read_text())
    widths = {config["hidden_size"], config["intermediate_size"]}
    assert {r["width"] for r in got["rows"]} == widths
    layers = config["num_hidden_layers"]
    # per layer: q/k/v's input, o's, gate/up's (hidden_size wide) and down's (intermediate_size wide)
    assert {r["width"]: r["inputs"] for r in got["rows"]} == {config["hidden_size"]: 3 * layers,
                                                              config["intermediate_size"]: layers}
    assert all(r["worst_1_minus_cos"] < 1e-6 and r["energy_ratio_min"] > 1 - 1e-6 for r in got["rows"])
    assert got["moment_everywhere_s"] == pytest.approx(got["forward_s"] + sum(r["moment_s"] for r in got["rows"]))
    assert "calibration forward" in out.stdout and (tmp_path / "b.png").stat().st_size > 0
