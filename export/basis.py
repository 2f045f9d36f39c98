"""Projection bases for LARS: one d×k matrix P per adapter input.

- pca (default): the top-k principal directions of each adapted input, from the model's own forward pass over
  calibration text (ESPACE-style: eigenvectors of the uncentred second moment Σ xᵀx). Real activations concentrate
  in few directions, so P·Pᵀ·x keeps most of x.
- random: a seeded Gaussian with entries N(0, 1/k), so E[P·Pᵀ] = I and the gradient is unbiased (but noisy).
- none: no projection (exact LoRA).
Adapters that read the same tensor (q, k, v; gate, up) get the same basis, since their inputs are identical.

The pca basis is built one decoder layer at a time (as GPTQ-style calibration does): the calibration batches' hidden
states are carried from layer to layer, so only one layer's inputs and second moments exist at a time (a 1.5B model's
d×d moments for all its layers would take ~10 GB), and the LM head is never run. Only the top k eigenvectors of each
moment are computed (block Krylov with Rayleigh–Ritz), once per distinct input: a full eigendecomposition of a
4864-wide moment takes ~30 s here, 24 of them per Qwen2.5-0.5B. Inputs wider than ~32 block widths (an MLP's
down_proj) never form the moment: the Krylov blocks are products with the activations themselves.
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


def _decoder_layers(peft_model):
    """(the module whose forward runs the layers, its ModuleList of decoder layers)."""
    import torch

    for name, module in peft_model.get_base_model().named_modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers):
            return module, layers
    raise LarsError(f"{type(peft_model.get_base_model()).__name__} has no ModuleList of decoder layers named "
                    f"`layers`; use --lars-basis random or none for this model")


def calibration_inputs(peft_model, batches):
    """Each adapter's input over the calibration batches, one decoder layer at a time.

    Yields, per layer, {first module reading an input: (X [tokens, d] float32, [every module reading it])}. q/k/v
    (and gate/up) read the same tensor: it is gathered once. The adapters are disabled (the base model's
    activations). Each layer runs on the hidden states the previous one produced, with the arguments the model's own
    forward passed it (recorded per layer: masks may differ between layers, e.g. sliding-window ones).
    """
    import torch

    modules = lora_modules(peft_model)
    owner, layers = _decoder_layers(peft_model)
    by_module = {id(m): n for n, m in modules.items()}
    per_layer = [[by_module[id(m)] for m in layer.modules() if id(m) in by_module] for layer in layers]
    if (missing := set(modules) - {n for names in per_layer for n in names}):
        raise LarsError(f"adapter {sorted(missing)[0]} is outside the decoder layers; use --lars-basis random or none")
    total = sum(len(ids) for ids in batches)

    # Record the arguments each layer receives, per batch: every layer's forward is swapped for one that keeps its
    # call and passes the hidden state through, so the model's forward builds the masks and position embeddings and
    # runs nothing else (no layer, no LM head: `owner` is the decoder stack).
    calls: list[list[tuple]] = [[] for _ in layers]

    def recorder(i):
        def forward(*args, **kwargs):
            calls[i].append((args, kwargs))
            return args[0]
        return forward

    with torch.no_grad(), peft_model.disable_adapter():
        try:
            for i, layer in enumerate(layers):
                layer.forward = recorder(i)  # an instance attribute: nn.Module.__call__ runs it
            for ids in batches:
                owner(input_ids=torch.tensor([ids]), use_cache=False)
        finally:
            for layer in layers:
                vars(layer).pop("forward", None)
        hidden = [args[0] for args, _ in calls[0]]

        for i, layer in enumerate(layers):
            buffers: dict[str, np.ndarray] = {}
            readers: dict[str, list[str]] = {}
            # (storage, shape) of an input in the current batch -> (first module reading it, the tensor): holding the
            # tensor keeps its storage from being reused by a later module's input within the batch.
            seen: dict[tuple, tuple] = {}
            row = 0

            def gather(name):
                def hook(module, args):
                    x = args[0]
                    key = (x.data_ptr(), tuple(x.shape))
                    if key in seen:  # another module reading the same tensor: gathered once
                        if name not in readers[seen[key][0]]:
                            readers[seen[key][0]].append(name)
                        return
                    seen[key] = (name, x)
                    x2 = x.detach().reshape(-1, x.shape[-1])
                    if name not in buffers:
                        buffers[name] = np.empty((total, x2.shape[1]), np.float32)
                        readers[name] = [name]
                    buffers[name][row:row + x2.shape[0]] = x2.float().numpy()
                return hook

            hooks = [modules[n].register_forward_pre_hook(gather(n)) for n in per_layer[i]]
            try:
                for b, (args, kwargs) in enumerate(calls[i]):
                    seen.clear()
                    out = layer(hidden[b], *args[1:], **kwargs)
                    hidden[b] = out[0] if isinstance(out, tuple) else out
                    row += hidden[b].shape[-2]
            finally:
                for h in hooks:
                    h.remove()
            calls[i] = []
            yield {name: (buffers.pop(name), readers[name]) for name in list(buffers)}


def second_moments(peft_model, batches) -> dict[str, np.ndarray]:
    """Σ xᵀx (float64, d×d) of every adapter's input over the calibration batches (modules reading the same input
    share one array). Holds every layer's moments at once: for inspection and tests; build_bases does not use it."""
    out = {}
    for layer in calibration_inputs(peft_model, batches):
        for x, readers in layer.values():
            moment = _moment(x)
            out.update(dict.fromkeys(readers, moment))
    return out


def _moment(x: np.ndarray) -> np.ndarray:
    # xᵀx of a contiguous float32 x is one BLAS syrk (half a matmul's work); summed in float32 over up to a few
    # thousand rows per entry (each entry's error is relative to its own terms), then float64 for the eigensolver.
    return (x.T @ x).astype(np.float64)


def top_eigenvectors(moment: np.ndarray, k: int, tol: float = 1e-6, seed: int = 0, max_blocks: int = 200
                     ) -> np.ndarray:
    """The k leading eigenvectors (d×k, by descending eigenvalue) of a symmetric positive semi-definite matrix.

    Block Krylov with Rayleigh–Ritz (`_block_krylov`); small problems (d ≤ 8b) take LAPACK's full eigh.
    """
    d = moment.shape[0]
    if 8 * _block_width(d, k) >= d:  # LAPACK's full eigh is as quick at this size
        return np.ascontiguousarray(np.linalg.eigh(moment)[1][:, ::-1][:, :k])
    vectors, converged = _block_krylov(moment.__matmul__, d, k, tol, seed, max_blocks)
    if not converged.all():
        log.warning("top_eigenvectors: %d of %d Ritz pairs converged after %d blocks (d=%d); using them as they are",
                    int(converged.sum()), k, max_blocks, d)
    return vectors


def top_principal_directions(x: np.ndarray, k: int, tol: float = 1e-6, seed: int = 0, max_blocks: int = 100
                             ) -> np.ndarray:
    """The k leading eigenvectors of xᵀx (d×k, by descending eigenvalue) for rows x [tokens, d] float32, without
    forming xᵀx: the Krylov blocks are xᵀ(x·q), two float32 products of tokens×d×b.

    Forming the moment is one syrk of tokens·d²/2 multiply-adds; ~8 blocks cost 16·tokens·d·b, so this is the
    cheaper path once d > 32·b (a 4864-wide down_proj input: ~0.6 s against ~2 s here) and it never holds a d×d
    float64 matrix (642 MB at d = 8960). Its products round in float32 every block: a moment whose leading
    eigenvalues are ~10⁴× its k-th or more (outlier dimensions) can leave the tail pairs short of `tol`: once the
    residuals stall, such inputs take the moment path instead (the answer the exporter gave before this path).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    d = x.shape[1]
    if 8 * _block_width(d, k) >= d:
        return top_eigenvectors(_moment(x), k, tol, seed)

    def apply(q: np.ndarray) -> np.ndarray:
        return (x.T @ (x @ q.astype(np.float32))).astype(np.float64)

    vectors, converged = _block_krylov(apply, d, k, tol, seed, max_blocks, stall=8)
    if converged.all():
        return vectors
    log.debug("top_principal_directions: %d of %d Ritz pairs converged with float32 products (d=%d); "
              "solving the float64 moment", int(converged.sum()), k, d)
    return top_eigenvectors(_moment(x), k, tol, seed)


def _block_width(d: int, k: int) -> int:
    return min(d, k + max(8, k // 2))  # k plus oversampling, so the k-th pair converges at a good rate


def _block_krylov(apply, d: int, k: int, tol: float, seed: int, max_blocks: int, stall: int | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The k leading Ritz vectors of the symmetric operator `apply` (d×b float64 -> d×b float64), and which of them
    converged: residual ‖M·v − θ·v‖ ≤ tol·θ. Block Krylov with Rayleigh–Ritz and full re-orthogonalisation (thick
    restart at 8 blocks); ~6–10 blocks for real activation moments, ~20–40 for a flat spectrum. With `stall`, it
    stops early once the worst unconverged residual has not halved in that many blocks (rounding in the operator
    has become the floor: more blocks cannot reach tol).
    """
    b = _block_width(d, k)
    max_dim = min(d, 8 * b)
    V = np.empty((d, max_dim))  # orthonormal Krylov basis
    W = np.empty((d, max_dim))  # moment @ V
    H = np.empty((max_dim, max_dim))  # Vᵀ·moment·V
    q = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, b)))[0]
    n = 0
    worst: list[float] = []  # per block: the largest residual / (tol·θ) among the k pairs
    for _ in range(max_blocks):
        V[:, n:n + b], W[:, n:n + b] = q, apply(q)
        H[:n + b, n:n + b] = V[:, :n + b].T @ W[:, n:n + b]
        H[n:n + b, :n] = H[:n, n:n + b].T
        n += b
        theta, u = np.linalg.eigh((H[:n, :n] + H[:n, :n].T) / 2)
        theta, u = theta[::-1], u[:, ::-1]
        vectors = V[:, :n] @ u[:, :k]
        residual = np.linalg.norm(W[:, :n] @ u[:, :k] - vectors * theta[:k], axis=0)
        # relative to each pair's own eigenvalue: a moment with outlier dimensions has θ₁ ~10⁶·θ_k, and a tolerance
        # on θ₁ would accept a k-th vector that is not an eigenvector at all (floored for rank-deficient moments)
        target = tol * np.maximum(theta[:k], 1e-9 * theta[0])
        converged = residual <= target
        if converged.all():
            break
        worst.append(float((residual / target).max()))
        if stall and len(worst) > stall and worst[-1] > 0.5 * min(worst[:-stall]):
            break
        if n + b > max_dim:  # restart from the b leading Ritz pairs
            V[:, :b], W[:, :b] = V[:, :n] @ u[:, :b], W[:, :n] @ u[:, :b]
            H[:b, :b] = np.diag(theta[:b])
            n = b
        # the next block: the last block's image, orthogonalised against the basis and normalised, twice (once the
        # basis nearly spans an invariant subspace the first pass leaves mostly rounding noise; the second makes
        # even that an exactly orthogonal extension)
        q = W[:, n - b:n]
        for _ in range(2):
            q = np.linalg.qr(q - V[:, :n] @ (V[:, :n].T @ q))[0]
    return vectors, converged


def solves_on_activations(d: int, k: int) -> bool:
    """Whether pca_basis takes the top k of a d-wide input from the activations (no d×d moment): see
    top_principal_directions."""
    return d > 32 * _block_width(d, k)


def pca_basis(x: np.ndarray, k: int) -> np.ndarray:
    """The top-k principal directions (uncentred) of the rows of x [tokens, d]."""
    if solves_on_activations(x.shape[1], k):
        return np.ascontiguousarray(top_principal_directions(x, k), dtype=np.float32)
    return np.ascontiguousarray(top_eigenvectors(_moment(x), k), dtype=np.float32)


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
    bases = {}
    for layer in calibration_inputs(peft_model, calibration_batches(tokenizer, calibration, calibration_tokens)):
        for x, readers in layer.values():
            bases.update(dict.fromkeys(readers, pca_basis(x, min(rank, x.shape[1]))))
        layer = x = None  # this layer's inputs go before the next layer's are gathered
    return bases
