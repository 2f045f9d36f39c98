"""`lars-export`: model -> LoRA -> ONNX -> preflight -> ORT artifacts -> bundle, one phase at a time.

The bundle is written to a staging directory beside OUT and renamed into place at the end, so a failed export
never leaves a half bundle (nor destroys an existing one unless --force).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import shutil
import sys
import tempfile
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

from lars_artifacts import (ATTENTION_MASK, CHECKPOINT, EVAL_MODEL, IGNORE_INDEX, INPUT_IDS, LABELS, LOGITS,
                            OPTIMIZER_MODEL, ORT_BACKEND, ORT_TRAINING_BACKEND, TOKENIZER, TOKENIZER_CONFIG,
                            TRAINING_MODEL, TRAINING_STEP, GraphIo, LarsError, Manifest, MemoryPlan, SpecialTokens,
                            write_manifest)
from lars_artifacts.measure import Stopwatch, peak_rss_mb

from . import adapters, architectures, basis, budget, load, onnx_export, training_graphs, passes, preflight, zo_step
from .config import ExportConfig

log = logging.getLogger(__name__)

EXPORT_PACKAGES = ("lars", "torch", "transformers", "peft", "onnx", "onnxruntime", "tokenizers")


class Phases:
    """Prints each slow phase as it starts and ends, with its time and the peak RSS so far."""

    def __init__(self, total: int, stream=None) -> None:
        self.total, self.n, self.stream = total, 0, stream or sys.stderr
        self.clock = Stopwatch()

    def __call__(self, what: str):
        self.n += 1
        return _Phase(self, what)


class _Phase:
    def __init__(self, phases: Phases, what: str) -> None:
        self.phases, self.what = phases, what

    def __enter__(self):
        self.clock = Stopwatch()
        print(f"[{self.phases.n}/{self.phases.total}] {self.what} ...", file=self.phases.stream, flush=True)
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            print(f"      done in {self.clock.seconds():.1f} s (peak RSS {_peaks()})", file=self.phases.stream,
                  flush=True)
        return False


def _peaks() -> str:
    """This process' peak RSS so far, and the largest of its onnxruntime-training children's (the gradient builder
    runs in a child: its memory is not in this process' high-water mark)."""
    from . import ort_training

    child = ort_training.child_peak_rss_mb
    return f"{peak_rss_mb():,.0f} MB" + (f"; gradient builder's process {child:,.0f} MB" if child else "")


def _versions() -> dict[str, str]:
    out = {}
    for pkg in EXPORT_PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    from . import ort_training

    out["onnxruntime-training (gradient builder)"] = ort_training.VERSION
    out["python"] = sys.version.split()[0]
    return out


def _save_tokenizer(tok, out: Path) -> SpecialTokens:
    tok.backend_tokenizer.save(str(out / TOKENIZER))
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    tokens = SpecialTokens(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=pad_id,
                           bos_token=tok.bos_token, eos_token=tok.eos_token)
    (out / TOKENIZER_CONFIG).write_text(json.dumps({**tokens.to_dict(), "chat_template": tok.chat_template},
                                                   indent=2) + "\n")
    return tokens


def run(config: ExportConfig, stream=None) -> Path:
    """Export a bundle, reporting its phases to `stream` (sys.stderr as it is when called: an app's redirection of
    it, or pytest's capture, sees the report)."""
    import onnx

    stream = stream or sys.stderr

    out = Path(config.out)
    if out.exists() and not config.force:
        raise LarsError(f"{out} already exists; pass --force to overwrite it or choose another --out")
    phases = Phases(total=7, stream=stream)
    source = load.resolve(config.model)
    model_config = load.load_config(source)
    arch = architectures.describe(model_config)
    plan = None
    if config.memory_budget:
        chosen, rows = budget.plan(arch, config)
        print(budget.describe(rows, chosen, config.memory_budget, config.max_seq_len), file=stream, flush=True)
        config = dataclasses.replace(config, **chosen.settings)
        plan = {"chosen": chosen.name, "stack": chosen.stack, "settings": chosen.settings, "candidates": rows}

    with phases(f"loading {source.gguf_file or source.name_or_path}"):
        tok = load.hf_tokenizer(source)
        model = load.load_model(source, model_config)
        peft_model, lora = adapters.add_lora(model, config)
        params = adapters.adapter_params(peft_model)
        n_base = sum(p.numel() for n, p in peft_model.named_parameters() if not p.requires_grad)

    with phases(f"LARS basis: {config.lars_basis}" + (f", rank {config.lars_rank}" if config.lars_basis != "none"
                                                       else " (exact LoRA)")):
        bases = basis.build_bases(config.lars_basis, config.lars_rank, peft_model, tok, config.calibration_data,
                                  config.calibration_tokens, config.seed)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        with phases("exporting to ONNX"):
            exported = staging / ".onnx"  # the graph and its frozen weights (external data, never loaded whole)
            exported.mkdir()
            onnx_export.export_onnx(peft_model, exported / "model.onnx", config.opset, model.config.vocab_size)
            del peft_model, model
            gc.collect()  # the torch weights go now (HF and PEFT modules hold reference cycles)
            graph = onnx.load(str(exported / "model.onnx"), load_external_data=False)  # ModelProto

        with phases("checking the graph (adapter tensors, gradient ops)"):
            names = {p.onnx_name for p in params}
            in_graph = {i.name for i in graph.graph.initializer} & names
            if in_graph != names:
                raise LarsError(f"the exported graph has {len(in_graph)} of {len(names)} adapter tensors (the exporter "
                                f"merged or renamed some, e.g. {sorted(names - in_graph)[:1]}); please report this model")
            onnx_export.zero_lora_b(graph, {p.onnx_name for p in params if ".lora_B." in p.onnx_name})
            checked = preflight.check_gradient_ops(graph, names, LOGITS)
            log.info("preflight: %d differentiable nodes have ORT gradient builders", checked)
            context = passes.PassContext(trainable=names, lars_bases=bases, loss_chunks=config.loss_chunks,
                                         quantize=config.quantize_weights, quantize_block=config.quantize_block_size,
                                         attention_chunks=config.attention_chunks,
                                         attention_row_chunks=config.attention_row_chunks,
                                         attention_heads=arch["num_attention_heads"],
                                         # every architecture lars exports is a decoder LM trained without a KV
                                         # cache: its mask hides the keys after each query's own position
                                         causal_attention=True, weights_dir=str(exported))
            enabled = passes.enabled_passes(config)
            reports = passes.run_passes(graph, context, stage="forward", enabled=enabled)

        with phases("generating ORT training artifacts"):
            training_graphs.generate(graph, sorted(names), staging, weights_dir=exported)
            del graph
            shutil.rmtree(exported)
            training = dataclasses.replace(context, weights_dir=None)  # the training graph's weights are in staging
            reports += training_graphs.rewrite_training_model(
                staging, lambda model: passes.run_passes(model, training, stage="training", enabled=enabled))
            weight_bytes = training_graphs.share_weights(staging)
            trainable = set(training_graphs.trainable_names(staging / CHECKPOINT))
            if trainable != names:
                raise LarsError(f"the ORT checkpoint holds {len(trainable)} trainable tensors, expected {len(names)}; "
                                f"please report this model")

        with phases("lowering the training step to standard ONNX (plain onnxruntime)"):
            step = training_graphs.write_training_step(staging, [p.onnx_name for p in params], config.strict_onnx)
            # forward-only (zeroth-order) training's graphs (zo_step.py)
            zo = zo_step.write_zo_step(staging, [p.onnx_name for p in params], TRAINING_STEP, step.loss)
            step = dataclasses.replace(step, zo=zo)
            models = {ORT_BACKEND: step.to_dict(),
                      ORT_TRAINING_BACKEND: {"training": TRAINING_MODEL, "eval": EVAL_MODEL,
                                             "optimizer": OPTIMIZER_MODEL, "checkpoint": CHECKPOINT}}
            zo_files = [f for f in (zo.forward, zo.file) if f]
            weights = training_graphs.weights_index(staging, [TRAINING_STEP, EVAL_MODEL, *zo_files])

        applied = {r.name for r in reports if r.changed}
        with phases("writing tokenizer and manifest"):
            tokens = _save_tokenizer(tok, staging)
            model_config.save_pretrained(staging)  # config.json (no quantization_config: see load.load_model)
            manifest = Manifest(
                source_model={**source.describe(), "name": model_config.name_or_path or source.name_or_path},
                architecture=arch,
                adapter={"peft_type": "LORA", "r": config.lora_rank, "lora_alpha": config.lora_alpha,
                         "scaling": config.lora_alpha / config.lora_rank, "target_modules": config.target_modules(),
                         "init_seed": config.seed,
                         "lars": {"basis": config.lars_basis,
                                  "rank": config.lars_rank if config.lars_basis != "none" else None,
                                  "calibration": (str(config.calibration_data or basis.DEFAULT_CALIBRATION)
                                                  if config.lars_basis == "pca" else None)},
                         "peft_config": adapters.peft_config_dict(lora, _base_model_name(source, model_config)),
                         "parameters": [p.to_dict() for p in params],
                         "trainable_parameters": sum(_numel(p.shape) for p in params),
                         "frozen_parameters": n_base, "frozen_weight_bytes": weight_bytes},
                io=GraphIo(inputs=[INPUT_IDS, ATTENTION_MASK, LABELS],
                           # the chunked loss never forms whole logits in training; the eval graph always outputs them
                           training_outputs=["loss"] if "chunked_loss" in applied else ["loss", LOGITS],
                           eval_outputs=["loss", LOGITS], logits_layout="[batch*sequence, vocab]",
                           ignore_index=IGNORE_INDEX, opset=config.opset).to_dict(),
                tokens=tokens.to_dict(),
                passes=[r.to_dict() for r in reports],
                models=models,
                weights=weights,
                memory=MemoryPlan(model=budget.model_for(arch, config), max_seq_len=config.max_seq_len, plan=plan,
                                  budget_bytes=budget.parse_size(config.memory_budget) if config.memory_budget
                                  else None,
                                  arena_regions=(budget.PRICED_ARENA_REGIONS if config.memory_budget
                                                 else None)).to_dict(),
                exporter={"versions": _versions(), "config": {k: (list(v) if isinstance(v, tuple) else v)
                                                              for k, v in asdict(config).items()}},
            )
            write_manifest(staging, manifest)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    print(f"bundle written to {out} in {phases.clock.seconds():.1f} s, peak RSS {_peaks()}", file=stream, flush=True)
    return out


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _base_model_name(source: load.Source, model_config) -> str:
    if source.kind == "hub":
        return source.name_or_path
    if source.gguf_file:
        return str(Path(source.name_or_path) / source.gguf_file)
    return source.name_or_path
