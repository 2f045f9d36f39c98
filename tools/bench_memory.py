"""Peak memory and step time vs sequence length, each mode in a fresh process, side by side with PyTorch + PEFT.

    python tools/bench_memory.py --seq-lens 256,512,1024,2048 --json bench.json --plot bench.png

Modes (same model, batch, length, LoRA rank/targets and thread count):
  peft      PyTorch + PEFT LoRA, SDPA attention, AdamW (what a user would otherwise run)
  ort-lora  our bundle with exact LoRA and no memory pass (--lars-basis none --no-recompute-attention
            --loss-chunks 0)
  lars      LARS alone (pca basis)
  lars-random  LARS with a random basis, alone
  recompute exact LoRA + attention recompute alone
  chunked-loss exact LoRA + the chunked loss alone
  default   the exporter's defaults: LARS + attention in 8 causal row chunks + chunked loss; default-whole: the
            defaults before the row chunks (LARS + attention recompute + chunked loss)
  stack     exact LoRA + layer recompute + attention recompute + chunked loss (--lars-basis none
            --recompute-layers): the lowest-memory exact bundle
  int8, int4  exact LoRA with the frozen weights stored quantized, no other pass (--quantize-weights)
  stack-int8, stack-int4  the stack with quantized frozen weights
  attn-chunks  exact LoRA + chunked attention alone, one head at a time (--attention-chunks)
  stack-chunks the stack with chunked attention (one head at a time) instead of attention recompute
  full      every memory pass: stack-chunks with INT4 frozen weights; full-int8: with INT8 ones
  stack-rows  stack-chunks with each head's query rows in 4 chunks and the loss in 16 (--attention-row-chunks 4
            --loss-chunks 16); full-int8-rows: the same with INT8 frozen weights
  full-int8-causal  layer recompute, attention in 16 causal row chunks (all heads at once), the loss in 16
            chunks, INT8 frozen weights; full-int8-h3r8: in 3 groups of heads x 8 causal row chunks, the loss in 8
  every other combination `--memory-budget` chooses among, by its name in lars_export.stacks (stack-causal,
            chunked-attention, recompute-chunked-loss, ...), with exact LoRA
  floor     PyTorch no-grad forward of the same model and length: the physical floor
A bundle mode takes a runtime setting after "@" (default: the runtime's memory-first defaults):
  @malloc   ORT's arena off (--no-memory-arena): a malloc per tensor, those of 1 MB and more in their own mapping
  @heap     ORT's arena off and glibc's default heap for every tensor (no mmap threshold)
  @reuse    ORT's buffer reuse on
  @exact    ORT's arena grown by regions of the size asked for (--arena-regions exact)
  @zo       forward-only training (--method zo), one direction per step: 2 forwards, one adapter setting each
  @zo-p2    the same with the (+, -) pair in one batched forward (--zo-parallel 2)
  @forward  a no-grad forward through the training step's forward graph (zo_forward.onnx: what @zo runs)
  @eval     a no-grad forward through the eval graph (what `lars-ort eval` runs)
  e.g. --modes default,default@malloc,lars,lars@reuse
and a backend after ":" (default: ort, the runtime's default):
  :ort           plain onnxruntime on the bundle's standard-ONNX training step (the base install's)
  :ort-training  onnxruntime-training 1.19.2 on ORT's own artifacts (the exporter's training build, put first on
                 the runtime environment's path)
  e.g. --modes default:ort,default:ort-training,full-int8:ort,full-int8:ort-training
and "~base" after a bundle mode's name: the bundle an earlier exporter wrote into --baseline-cache (before / after
an exporter change, side by side in one run), e.g. --modes peft,default~base,default --baseline-cache out/bench-old
Each point runs in its own process: one warm-up step, then --steps measured steps (median time; --steps 0: one cold
step, a quick look that can read a few percent below the steady peak: the 3B `full` stack at 4096 tokens without
the arena peaked 5,352 MB in its first step and at least 5,589 in its second); the peak RSS is the OS's high-water
mark for the whole process. A point over --mem-limit-mb is killed and recorded as "oom".
The parent also samples the child's resident memory every 50 ms split as the kernel counts it (RssAnon: heap and
arena, what the step allocates; RssFile: memory-mapped weights and libraries, clean pages the kernel can drop and
re-read): the row's anon_peak_mb is the highest anonymous sample, file_at_peak_mb the file-backed part at the
highest total sample (MeBP-style accounting reports the two apart).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lars_export.stacks import STACKS

REPO = Path(__file__).resolve().parent.parent
# Bundle modes: the export settings of each (everything else equal). The memory passes' combinations are
# lars_export.stacks' (what --memory-budget chooses among), with exact LoRA; the rest vary LARS and the defaults.
BUNDLE_MODES = {
    **{name: {"lars_basis": "none", **settings} for name, settings in STACKS.items()},
    "lars": {**STACKS["ort-lora"], "lars_basis": "pca"},
    "lars-random": {**STACKS["ort-lora"], "lars_basis": "random"},
    "default": {},  # the exporter's defaults
    "default-whole": {"attention_row_chunks": 0},  # the defaults before causal row chunks: attention whole
    "default-rows4": {"attention_row_chunks": 4},
    "full-int8-h3r8": {"lars_basis": "none", "recompute_layers": True, "attention_chunks": 3,
                       "attention_row_chunks": 8, "quantize_weights": "int8"},
}
MODES = ("peft", *BUNDLE_MODES, "floor")
# Runtime settings a bundle mode can take after "@": Trainer keyword arguments.
RUNTIME_SETTINGS = {"": {}, "malloc": {"memory_arena": False}, "heap": {"memory_arena": False, "mmap_threshold_mb": 0},
                    "reuse": {"memory_reuse": True}, "exact": {"arena_regions": "exact"},
                    # forward-only training (--method zo), one direction per step (2 forwards): one adapter
                    # setting per forward, or the (+, -) pair in one
                    "zo": {"method": "zo", "zo": {"perturbations": 1}},
                    "zo-p2": {"method": "zo", "zo": {"perturbations": 1, "parallel": 2}},
                    # no-grad forwards, no training session: the training step's forward (zo_forward.onnx, what
                    # zo runs), and the eval graph (what `lars-ort eval` runs)
                    "forward": {"method": "zo", "zo": {}}, "eval": {}}


BACKENDS = ("ort", "ort-training")


BASELINE = "~base"  # a bundle mode's suffix: its bundle from --baseline-cache (an earlier exporter's)


def split_mode(mode: str) -> tuple[str, str]:
    """(bundle or reference mode, runtime setting); the backend suffix is split_backend's, the baseline marker
    is_baseline's."""
    base, _, setting = mode.partition(":")[0].partition("@")
    return base.removesuffix(BASELINE), setting


def is_baseline(mode: str) -> bool:
    return mode.partition(":")[0].partition("@")[0].endswith(BASELINE)


def baseline_bundle(cache: Path, mode: str, a) -> Path:
    """A bundle mode's bundle as an earlier exporter wrote it into `cache` (never exported here: that would be
    this exporter's)."""
    bundle = bundle_dir(cache, a.rank, a.targets, split_mode(mode)[0], a.loss_chunks)
    if not (bundle / "manifest.json").is_file():
        raise SystemExit(f"--baseline-cache {cache} has no {bundle.name}: export it there with the earlier exporter "
                         f"(a worktree of the earlier commit) first")
    return bundle


def pass_report(bundle: Path, name: str) -> dict | None:
    """The bundle's report of the named pass (manifest passes), None if its exporter did not run it."""
    passes = json.loads((bundle / "manifest.json").read_text()).get("passes", [])
    return next((p for p in passes if p["name"] == name), None)


def tied_table_once(bundle: Path) -> bool:
    """Whether the bundle stores a tied embedding table once (its lookups read the output projection's copy:
    pretranspose_frozen's tied_lookups); bundles of earlier exporters stored it twice."""
    return bool((pass_report(bundle, "pretranspose_frozen") or {}).get("details", {}).get("tied_lookups"))


def has_cheap_recompute(bundle: Path) -> bool:
    """Whether the bundle's exporter ran the cheap_recompute pass (the memory model predicts bundles before it
    apart: they keep the MLP activation and the repeated K and V)."""
    return pass_report(bundle, "cheap_recompute") is not None


def split_backend(mode: str) -> str:
    return mode.partition(":")[2] or "ort"


# ----------------------------------------------------------------------------------------------------------- workers
def _peak_mb() -> float:
    from lars_artifacts.measure import peak_rss_mb

    return peak_rss_mb()


def _tokens(vocab: int, batch: int, seq: int, step: int):
    import numpy as np

    return np.random.default_rng(step).integers(0, vocab, size=(batch, seq)).astype(np.int64)


def _torch_model(model_dir: str, attn: str):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn)


def worker_peft(a) -> list[float]:
    import torch
    from peft import LoraConfig, get_peft_model

    from lars_export.config import TARGET_ALIASES

    torch.set_num_threads(a.threads)
    model = get_peft_model(_torch_model(a.model_dir, "sdpa"), LoraConfig(
        r=a.rank, lora_alpha=2 * a.rank, target_modules=[TARGET_ALIASES.get(t, t) for t in a.targets.split(",")], lora_dropout=0.0, task_type="CAUSAL_LM"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times = []
    for step in range(a.steps + 1):
        ids = torch.from_numpy(_tokens(model.config.vocab_size, a.batch_size, a.seq_len, step))
        t = time.perf_counter()
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return times


def worker_floor(a) -> list[float]:
    import torch

    torch.set_num_threads(a.threads)
    model = _torch_model(a.model_dir, "sdpa").eval()
    times = []
    with torch.no_grad():
        for step in range(a.steps + 1):
            ids = torch.from_numpy(_tokens(model.config.vocab_size, a.batch_size, a.seq_len, step))
            t = time.perf_counter()
            model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
            times.append(time.perf_counter() - t)
    return times


def worker_ort(a) -> list[float]:
    from lars_artifacts import load_bundle
    from lars_ort import Trainer
    from lars_ort.zo import ZoConfig

    settings = dict(RUNTIME_SETTINGS[a.setting])
    bundle = load_bundle(a.bundle, verify=False)
    if a.setting == "eval":  # a ZO engine's eval without the bundle's zo graphs: eval_model.onnx, no training session
        bundle.manifest.models["ort"]["zo"] = None
        settings = {"method": "zo", "zo": {}}
    if "zo" in settings:
        settings["zo"] = ZoConfig(**settings["zo"])
    trainer = Trainer(bundle, load_eval=False, threads=a.threads, backend=a.backend, **settings)
    if a.setting in ("forward", "eval"):
        run = trainer.engine.eval_step
    else:
        run = lambda batch: trainer.step(batch, lr=1e-4)  # noqa: E731
    vocab = trainer.bundle.manifest.vocab_size
    times = []
    for step in range(a.steps + 1):
        batch = trainer.batch(_tokens(vocab, a.batch_size, a.seq_len, step))
        t = time.perf_counter()
        run(batch)
        times.append(time.perf_counter() - t)
    return times


WORKERS = {"peft": worker_peft, "floor": worker_floor, **{mode: worker_ort for mode in BUNDLE_MODES}}


def run_worker(a) -> None:
    times = WORKERS[split_mode(a.worker)[0]](a)
    measured = times[1:] or times  # after the warm-up step; with --steps 0 the one cold step
    print("RESULT " + json.dumps({"step_s": statistics.median(measured), "peak_rss_mb": _peak_mb()}), flush=True)


# ------------------------------------------------------------------------------------------------------- preparation
def prepare_model(model: str | None, cache: Path) -> Path:
    """A float32 HF folder of the model, so every mode loads the same weights the same way (not from GGUF)."""
    from lars_export import load

    source = load.resolve(model)
    if source.kind in ("folder",):
        return Path(source.name_or_path)
    folder = cache / "model"
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoModelForCausalLM

    m = load.load_model(source, load.load_config(source))
    tok = load.hf_tokenizer(source)
    # A GGUF-loaded model refuses save_pretrained: rebuild it from its (dequantized) config and copy the weights.
    fresh = AutoModelForCausalLM.from_config(m.config, dtype=torch.float32)
    fresh.load_state_dict(m.state_dict())
    fresh.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def bundle_dir(cache: Path, rank: int, targets: str, mode: str, loss_chunks: int | None) -> Path:
    """Where a mode's bundle lies in a cache."""
    return cache / (f"bundle-{mode}-r{rank}-{targets.replace(',', '-')}"
                    + ("" if loss_chunks is None else f"-loss{loss_chunks}"))


def prepare_bundle(model_dir: Path, cache: Path, rank: int, targets: str, mode: str = "ort-lora",
                   loss_chunks: int | None = None) -> Path:
    """The bundle of a mode, exported once into the cache (a changed exporter means: clear the cache);
    `loss_chunks` overrides the mode's (a bundle of its own)."""
    from lars_export import ExportConfig, export

    settings = dict(BUNDLE_MODES[mode], **({} if loss_chunks is None else {"loss_chunks": loss_chunks}))
    out = bundle_dir(cache, rank, targets, mode, loss_chunks)
    if not (out / "manifest.json").is_file():
        export(ExportConfig(model=str(model_dir), out=str(out), lora_rank=rank, lora_alpha=2 * rank,
                            targets=tuple(targets.split(",")), force=True, **settings))
    return out


# ------------------------------------------------------------------------------------------------------------ driver
def measure(mode: str, seq: int, a, model_dir: Path, bundle: Path | None) -> dict:
    import psutil

    from lars_artifacts.measure import rss_split_mb

    # ORT modes run where the runtime runs on a device: in the base-install environment without torch (importing
    # onnxruntime next to an installed torch imports torch too, which would inflate our RSS).
    base, setting = split_mode(mode)
    python = a.runtime_python if base in BUNDLE_MODES else sys.executable
    backend = split_backend(mode) if base in BUNDLE_MODES else None  # PyTorch rows have none
    env = None
    if backend == "ort-training":  # the training build first on the path, ahead of the base install's onnxruntime
        from lars_export import ort_training

        env = ort_training.child_env()
    cmd = [python, __file__, "--worker", mode, "--setting", setting, "--backend", backend or "ort", "--seq-len", str(seq),
           "--batch-size", str(a.batch_size), "--steps", str(a.steps), "--threads", str(a.threads),
           "--rank", str(a.rank), "--targets", a.targets, "--model-dir", str(model_dir)] + (["--bundle", str(bundle)] if bundle else [])
    row = {"mode": mode, "backend": backend, "seq_len": seq, "python": python, "batch_size": a.batch_size, "peak_rss_mb": None, "step_s": None,
           "tokens_per_s": None, "status": "ok", "rank": a.rank, "targets": a.targets, "arch": a.arch,
           "loss_chunks": a.loss_chunks if base in BUNDLE_MODES else None,
           "anon_peak_mb": None, "file_at_peak_mb": None, "bundle": str(bundle) if bundle else None,
           "tied_table_once": tied_table_once(bundle) if bundle else None,
           "cheap_recompute": has_cheap_recompute(bundle) if bundle else None}
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, env=env)
        child, start, high, sampled_total = psutil.Process(proc.pid), time.time(), 0.0, 0.0
        while proc.poll() is None:
            split = rss_split_mb(proc.pid)  # one /proc read per sample; psutil where there is no such file
            if split:
                total, anon, file = split
                high = max(high, total)
                row["anon_peak_mb"] = max(row["anon_peak_mb"] or 0.0, anon)
                if anon + file > sampled_total:
                    sampled_total, row["file_at_peak_mb"] = anon + file, file
            else:
                try:
                    high = max(high, child.memory_info().rss / 2**20)
                except psutil.Error:
                    pass
            if high > a.mem_limit_mb:
                proc.kill()
                row["status"] = "oom"
            elif time.time() - start > a.timeout:
                proc.kill()
                row["status"] = "timeout"
            time.sleep(0.05)
        out.seek(0)
        text = out.read()
    result = next((json.loads(line[7:]) for line in text.splitlines() if line.startswith("RESULT ")), None)
    if row["status"] == "ok" and result is None:
        row["status"] = "oom" if proc.returncode in (-9, 137) else "error"
        row["error"] = text.strip().splitlines()[-1][:300] if text.strip() else f"exit {proc.returncode}"
    if result:
        row.update(result)
        row["tokens_per_s"] = a.batch_size * seq / result["step_s"]
    elif row["status"] == "oom":
        row["peak_rss_mb"] = high
    return row


def slope(rows: list[dict], mode: str) -> float | None:
    import numpy as np

    pts = [(r["seq_len"], r["peak_rss_mb"]) for r in rows if r["mode"] == mode and r["status"] == "ok"]
    if len(pts) < 2:
        return None
    x, y = np.array(pts, dtype=float).T
    return float(np.polyfit(x / 1000.0, y, 1)[0])


def table(rows: list[dict], modes: list[str]) -> str:
    by = {(r["mode"], r["seq_len"]): r for r in rows}
    lines = ["| mode | seq | peak RSS MB | anon peak MB | file-backed MB | step s | tokens/s | × peft mem | "
             "× floor mem | × peft time | status |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, f: "—" if v is None else format(v, f)  # noqa: E731
    for r in rows:
        peft, floor = by.get(("peft", r["seq_len"])), by.get(("floor", r["seq_len"]))

        def ratio(ref, key):
            ok = ref and ref["status"] == "ok" and r["status"] == "ok"
            return r[key] / ref[key] if ok else None

        lines.append(f"| {r['mode']} | {r['seq_len']} | {fmt(r['peak_rss_mb'], ',.0f')} | "
                     f"{fmt(r.get('anon_peak_mb'), ',.0f')} | {fmt(r.get('file_at_peak_mb'), ',.0f')} | "
                     f"{fmt(r['step_s'], '.2f')} | "
                     f"{fmt(r['tokens_per_s'], ',.0f')} | {fmt(ratio(peft, 'peak_rss_mb'), '.2f')} | "
                     f"{fmt(ratio(floor, 'peak_rss_mb'), '.2f')} | {fmt(ratio(peft, 'step_s'), '.2f')} | "
                     f"{r['status']} |")
    lines += ["", "| mode | memory slope (MB per 1K tokens, linear fit) |", "|---|---|"]
    for mode in modes:
        s = slope(rows, mode)
        lines.append(f"| {mode} | {'—' if s is None else f'{s:,.0f}'} |")
    return "\n".join(lines)


def plot(rows: list[dict], modes: list[str], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode in modes:
        pts = sorted((r["seq_len"], r["peak_rss_mb"], r["step_s"]) for r in rows
                     if r["mode"] == mode and r["status"] == "ok")
        if pts:
            x, mem, sec = zip(*pts)
            ax1.plot(x, [m / 1024 for m in mem], marker="o", label=mode)
            ax2.plot(x, sec, marker="o", label=mode)
        for r in rows:
            if r["mode"] == mode and r["status"] == "oom":
                ax1.scatter([r["seq_len"]], [r["peak_rss_mb"] / 1024], marker="x", color="red")
    ax1.set(xlabel="sequence length (tokens)", ylabel="peak RSS (GiB)", title="peak memory")
    ax2.set(xlabel="sequence length (tokens)", ylabel="seconds per step", title="step time")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model to benchmark (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--seq-lens", default="256,512,1024,2048")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=2,
                   help="measured steps after the warm-up step (0: one cold step, no warm-up: a quick look at the "
                        "memory, not the steady peak, which a second step can raise by a few percent; the time "
                        "includes the first step's page faults)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="q,k,v,o,gate,up,down")
    p.add_argument("--loss-chunks", type=int, help="every bundle mode's --loss-chunks (default: each mode's own; a "
                   "large vocabulary wants more: one chunk's [rows, vocab] tensors are the loss' peak)")
    p.add_argument("--mem-limit-mb", type=float, default=20000)
    p.add_argument("--timeout", type=float, default=1800, help="seconds per point")
    p.add_argument("--cache", default=str(REPO / "out" / "bench"), help="prepared model folder and bundles")
    p.add_argument("--baseline-cache", help=f"bundles an earlier exporter wrote (a cache of that version): a bundle "
                                            f"mode written MODE{BASELINE} runs that bundle, beside this exporter's "
                                            f"in the same run (before / after an exporter change)")
    default_rt = REPO / ".venv-runtime" / "bin" / "python"
    p.add_argument("--runtime-python", default=str(default_rt) if default_rt.exists() else sys.executable,
                   help="python of the torch-free runtime environment for the ORT modes (default: .venv-runtime)")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--plot", help="write a PNG here")
    p.add_argument("--print-bundle-modes", action="store_true", help="print each bundle mode's export settings as "
                   "JSON and exit")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--setting", default="", help=argparse.SUPPRESS)
    p.add_argument("--backend", default="ort", help=argparse.SUPPRESS)
    p.add_argument("--seq-len", type=int, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--bundle", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.steps < 0:
        p.error(f"--steps must be at least 0, got {a.steps}")
    if a.worker:
        run_worker(a)
        return 0
    if a.print_bundle_modes:
        print(json.dumps(BUNDLE_MODES, indent=2))
        return 0

    modes = [m for m in a.modes.split(",") if m]
    unknown = [m for m in modes if split_mode(m)[0] not in MODES or split_mode(m)[1] not in RUNTIME_SETTINGS
               or ((split_mode(m)[1] or ":" in m) and split_mode(m)[0] not in BUNDLE_MODES)
               or split_backend(m) not in BACKENDS or (is_baseline(m) and split_mode(m)[0] not in BUNDLE_MODES)]
    if unknown:
        p.error(f"unknown modes {unknown}; choose from {', '.join(MODES)}, bundle modes optionally with "
                f"@{', @'.join(s for s in RUNTIME_SETTINGS if s)} and :{' or :'.join(BACKENDS)}")
    cache = Path(a.cache)
    cache.mkdir(parents=True, exist_ok=True)
    print("preparing the model folder and the bundle ...", file=sys.stderr, flush=True)
    model_dir = prepare_model(a.model, cache)
    from lars_export import architectures, load

    a.arch = architectures.describe(load.load_config(load.resolve(str(model_dir))))  # recorded in each row
    if any(is_baseline(m) for m in modes) and not a.baseline_cache:
        p.error(f"modes ending in {BASELINE} need --baseline-cache")
    bundles = {m: baseline_bundle(Path(a.baseline_cache), m, a) if is_baseline(m) else
               prepare_bundle(model_dir, cache, a.rank, a.targets, split_mode(m)[0], a.loss_chunks) for m in modes
               if split_mode(m)[0] in BUNDLE_MODES}
    rows = []
    for seq in [int(s) for s in a.seq_lens.split(",")]:
        for mode in modes:
            row = measure(mode, seq, a, model_dir, bundles.get(mode))
            rows.append(row)
            print(f"{mode:>14} seq {seq:>5}: {row['status']:>7} peak {row['peak_rss_mb'] or 0:8,.0f} MB "
                  f"(anon {row['anon_peak_mb'] or 0:,.0f} MB)  step {row['step_s'] or 0:6.2f} s {row.get('error', '')}",
                  file=sys.stderr, flush=True)
            if a.json:  # after every point: a long run stopped midway keeps what it measured
                Path(a.json).write_text(json.dumps(rows, indent=2) + "\n")
    name = a.model or "SmolLM2-135M-Instruct (embedded default)"
    title = f"{Path(name).name}, batch {a.batch_size}, LoRA r={a.rank} ({a.targets}), {a.threads} threads"
    print(f"\n{title}\n\n{table(rows, modes)}")
    if a.plot:
        plot(rows, modes, a.plot, title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
