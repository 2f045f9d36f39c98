"""Projection bases for LARS: one d×k matrix P per adapter input.

- pca (default): the top-k principal directions of each adapted input, from the model's own forward pass over
  calibration text (ESPACE-style: eigenvectors of the uncentred second moment Σ xᵀx). Real activations concentrate
  in few directions, so P·Pᵀ·x keeps most of x.
- random: a seeded Gaussian with entries N(0, 1/k), so E[P·Pᵀ] = I and the gradient is unbiased (but noisy).
- none: no projection (exact LoRA).
Adapters that read the same tensor (q, k, v; gate, up) get the same basis, since their inputs are identical.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from lars_artifacts import LarsError

from .adapters import GRAPH_PREFIX

log = logging.getLogger(__name__)

BASES = ("pca", "random", "none")
DEFAULT_CALIBRATION = Path(__file__).with_name("calibration.txt")


def lora_modules(peft_model) -> dict[str, object]:
    """Graph name of each lora_A parameter -> its PEFT LoRA module."""
    out = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "base_layer") and "default" in getattr(module, "lora_A", {}):
            out[f"{GRAPH_PREFIX}{name}.lora_A.default.weight"] = module
    return out


def calibration_batches(tokenizer, path: str | Path | None, max_tokens: int, seq_len: int = 256):
    path = Path(path) if path else DEFAULT_CALIBRATION
    if not path.is_file():
        raise LarsError(f"calibration data {path} does not exist; pass a UTF-8 text file to --calibration-data")
    text = path.read_text(encoding="utf-8", errors="replace")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    if len(ids) < 16:
        raise LarsError(f"calibration data {path} holds only {len(ids)} tokens; pass at least a few paragraphs")
    return [ids[i:i + seq_len] for i in range(0, len(ids), seq_len) if len(ids[i:i + seq_len]) >= 2]


def second_moments(peft_model, batches) -> dict[str, np.ndarray]:
    """Σ xᵀx (float64, d×d) of every adapter's input over the calibration batches."""
    import torch

    modules = lora_modules(peft_model)
    sums: dict[str, torch.Tensor] = {}
    alias: dict[str, str] = {}      # module -> the module whose identical input was accumulated
    # (storage, shape) of an input in the current batch -> (first module reading it, the tensor). Holding the tensor
    # keeps its storage from being reused by a later layer's input within the batch.
    seen: dict[tuple, tuple] = {}
    hooks = []
    for name, module in modules.items():
        def hook(mod, args, name=name):
            x = args[0]
            key = (x.data_ptr(), tuple(x.shape))
            if key in seen:  # q/k/v (and gate/up) read the same tensor: accumulate it once
                alias[name] = seen[key][0]
                return
            seen[key] = (name, x)
            alias[name] = name
            x2 = x.detach().reshape(-1, x.shape[-1]).double()
            sums[name] = sums.get(name, 0) + x2.T @ x2
        hooks.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad(), peft_model.disable_adapter():
            for ids in batches:
                seen.clear()
                peft_model(input_ids=torch.tensor([ids]), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {name: sums[alias[name]].numpy() for name in modules}


def pca_basis(moment: np.ndarray, k: int) -> np.ndarray:
    values, vectors = np.linalg.eigh(moment)  # ascending
    return np.ascontiguousarray(vectors[:, ::-1][:, :k], dtype=np.float32)


def random_basis(d: int, k: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=(d, k)) / np.sqrt(k)).astype(np.float32)


def build_bases(kind: str, rank: int, peft_model, tokenizer=None, calibration: str | None = None,
                calibration_tokens: int = 8192, seed: int = 0) -> dict[str, np.ndarray]:
    """lora_A graph name -> P [d, min(rank, d)]."""
    if kind == "none":
        return {}
    if kind not in BASES:
        raise LarsError(f"--lars-basis {kind!r} is unknown; use one of {', '.join(BASES)}")
    if rank < 1:
        raise LarsError(f"--lars-rank must be at least 1, got {rank}")
    modules = lora_modules(peft_model)
    if kind == "random":
        # One draw per distinct input width and seed: adapters sharing an input must share P.
        return {n: random_basis(m.in_features, min(rank, m.in_features), seed + m.in_features)
                for n, m in modules.items()}
    moments = second_moments(peft_model, calibration_batches(tokenizer, calibration, calibration_tokens))
    return {n: pca_basis(moments[n], min(rank, moments[n].shape[0])) for n in modules}
