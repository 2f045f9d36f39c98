"""Peak memory of one training step, predicted from the architecture and the memory passes of a bundle.

Both halves use it: `lars-export --memory-budget` picks the passes whose predicted peak fits, and `lars-ort train`
warns before a step whose batch and length would exceed the bundle's budget. Pure arithmetic, no imports beyond
the standard library.

The model (bytes; b = batch, T = sequence length, L layers, float32 activations):

    peak(b, T) = runtime + weights + b·T·saved_per_token + b·T²·saved_per_token_sq
                 + max(b·T·turn_per_token, b·T²·backward_per_token_sq + b·T·backward_per_token)

- saved: what the forward keeps for the backward, alive at the turn (where an exact step peaks). Per layer and
  token, for the Llama/Qwen2 block as ORT differentiates it (tools/memory_breakdown.py measures these from the
  graph; the numbers below are what it finds): the residual stream and norm inputs 2d, Q (H·head_dim) and K and V
  before their GQA repeat (2·kv·head_dim), the MLP's gate and up 2f (the cheap_recompute pass recomputes the
  activation; bundles before it, and Gemma's tanh GELU, keep it too: 3f, and K and V repeated, 3·H·head_dim), the
  adapter inputs (d per distinct input of q/k/v, o, gate/up; f for down; LARS keeps k per distinct input instead), r per adapter; attention probabilities H·T² per layer
  (none with attention recompute); once for all layers the causal mask T² (with N causal row chunks its blocks on
  and below the diagonal, (N + 1) / 2N of it), the rotary cos/sin 2·head_dim and the loss' log-probabilities,
  vocab per token (a chunked loss keeps its gradient with respect to the final hidden state, d, instead). Layer
  recompute keeps d per layer and token (each block's input, and the last block's output) and what all layers
  share.
- turn: the loss' other [T, vocab] tensors at the turn (logits and their gradient), or about five chunks' worth.
- backward: with attention recomputed (any of the three passes), one layer's recomputed probabilities and their
  two gradients, 3·H·T², or with chunked attention one group's, about 3·(H/G)·T² (its pieces run in turn
  and free their tensors), divided by the chunks of query rows; with layer recompute also one block's activations
  (all of them: the block's copy is made in the backward, where cheap_recompute has nothing to free). Either way
  a layer's MLP gradients, 3f, exist beside them.
  Without recompute, dP and dS, 2·H·T².
- weights: the frozen matrices as stored (float32, INT8 or INT4; a tied embedding once, as the pre-transposed
  output projection its lookups also read), plus, when quantized, the largest dequantized transient: the output
  projection [hidden, vocab] at the loss, where the step peaks, whole up to DEQUANTIZED_SLICE_BYTES and one slice
  of it above (the dequantize_in_slices pass), or a layer's largest matrix (twice for INT4, whose unpacking holds
  two copies).
- runtime: the process without tensors: Python, numpy, tokenizers and onnxruntime's sessions, which grow with the
  nodes a pass adds (measured, below).

Validated against measured peaks (docs/bench/*.json, tools/validate_memory_model.py, tests/test_memory_model.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

F32 = 4
# Peak RSS of the runtime process without tensors, measured on SmolLM2-135M bundles in the torch-free environment:
# the exact-LoRA peaks at 512/1024/2048 tokens minus what the graph keeps at the turn and the weights file give
# 160, 174, 167 MB (docs/BENCHMARKS.md, "What a step keeps").
RUNTIME_BYTES = 170 * 2**20
# ORT's session grows with the graph, about 5 KB per node (peak RSS right after loading, SmolLM2-135M bundles:
# exact 220 MB, layer recompute 243, chunked attention 251, both 284, both with INT8 weights 290, with INT4 319).
# Per unit of what each pass adds:
SESSION_BYTES = {"layer_recompute": 0.8 * 2**20,   # per layer (the block's forward, copied)
                 "attention_chunks": 0.13 * 2**20,  # per layer and group of heads
                 # per layer, group and chunk of query rows after the first (full-int8 with 4 row chunks: 434 MB
                 # after loading, 290 without; the pieces' gates, slices and sums count)
                 "attention_row_chunks": 0.18 * 2**20,
                 # and per layer and chunk after the first, whatever the groups: its slices of Q, Kᵀ, V and dO and
                 # their gates (the bounds and mask blocks are shared by all layers). SmolLM2 INT8 stacks with layer
                 # recompute after loading: 16 row chunks of all heads +79 MB over one head at a time, all rows
                 "row_chunk": 0.06 * 2**20,
                 "int8": 0.03 * 2**20, "int4": 0.17 * 2**20}  # per quantized matrix (its dequantizations)
# A chunked loss holds about five [rows / chunks, vocab] tensors at the turn (measured on stack bundles with chunked
# attention at 2048 tokens, where the loss is the peak, when the backward recomputed each chunk's logits). Since
# each chunk's gradient is computed with it in the forward, three are alive at a time (the last chunk's logits,
# log-probabilities and gradient), yet the same bundles measure within 3 MB of before (full-int8 at 2048 tokens:
# 891 -> 888 MB), so the count stands.
CHUNKED_LOSS_TENSORS = 5
# Chunked attention holds about three [group, rows, T] tensors in a piece of a layer's backward (two of scores,
# scaled and masked scores and probabilities; then probabilities, dP and dS), as whole attention does: its pieces
# run one after the other and each frees its tensors before the next starts (tools/alloc_trace.py, SmolLM2 at
# 2048 tokens: at most two 16 MB [1, T, T] tensors alive at a time, plus the mask). Before the pieces were
# ordered (dP gated, dQ last), ORT computed a layer's dP all at once and this was 8.
CHUNKED_ATTENTION_TENSORS = 3
# A layer's MLP backward holds the gradients of gate, up and their product ([T, f] each) beside what the forward
# left: 7 [T, f] tensors alive at the peak of Llama-3.2-1B/3B-class full stacks where the saved set counts 4
# (tools/alloc_trace.py at 2048 and 4096 tokens); SmolLM2's peaks mostly sit at the loss, where this does not show.
MLP_GRADIENTS = 3


@dataclass(frozen=True)
class MemoryModel:
    runtime: float
    weights: float
    saved_per_token: float
    saved_per_token_sq: float
    turn_per_token: float
    backward_per_token: float
    backward_per_token_sq: float

    def peak_bytes(self, batch: int, seq_len: int) -> float:
        n, n2 = batch * seq_len, batch * seq_len * seq_len
        return (self.runtime + self.weights + n * self.saved_per_token + n2 * self.saved_per_token_sq
                + max(n * self.turn_per_token, n2 * self.backward_per_token_sq + n * self.backward_per_token))

    def max_seq_len(self, budget_bytes: float, batch: int = 1, limit: int = 1 << 20) -> int:
        """The longest sequence whose predicted peak fits the budget (0 if none)."""
        lo, hi = 0, limit
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.peak_bytes(batch, mid) <= budget_bytes:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "MemoryModel":
        return cls(**{k: float(data[k]) for k in cls.__dataclass_fields__})


def _adapter_inputs(targets: list[str], d: int, f: int) -> tuple[int, int]:
    """(float width of the distinct adapter inputs per token, how many distinct inputs): q/k/v share the normed
    hidden state, gate/up the other; o reads the attention output, down the MLP hidden state."""
    groups = [({"q_proj", "k_proj", "v_proj"}, d), ({"o_proj"}, d), ({"gate_proj", "up_proj"}, d), ({"down_proj"}, f)]
    used = [(names, width) for names, width in groups if names & set(targets)]
    return sum(width for _, width in used), len(used)


# The largest float32 copy of a quantized matrix a step makes: larger ones are dequantized in column slices of at
# most this (export pass dequantize_in_slices). About one loss chunk's [rows, vocab] logits at 2048 tokens on a
# 128K vocabulary, the size of the step's other large transients: cutting smaller would gain little there.
DEQUANTIZED_SLICE_BYTES = 128 * 2**20


def dequantized_slices(k: int, n: int, limit: int = DEQUANTIZED_SLICE_BYTES) -> int:
    """How many column slices dequantize_in_slices cuts an INT8 [k, n] matrix into: 1 (whole) up to `limit` bytes
    of float32."""
    return -(-F32 * k * n // limit)


def dequantized_slice_bytes(k: int, n: int) -> float:
    """The float32 bytes of the largest piece of an INT8 [k, n] matrix that exists at once: all of it, or one of
    the column slices dequantize_in_slices cuts it into."""
    return F32 * k * -(-n // dequantized_slices(k, n))


def weight_bytes(arch: dict, scheme: str = "none", block: int = 32) -> tuple[float, float]:
    """(bytes of the frozen matrices as stored, bytes of the largest dequantized transient) for an architecture."""
    d, f, L = arch["hidden_size"], arch["intermediate_size"], arch["num_hidden_layers"]
    v, heads, kv = arch["vocab_size"], arch["num_attention_heads"], arch["num_key_value_heads"]
    hd = arch.get("head_dim") or d // heads
    layer_mats = [(d, heads * hd), (d, kv * hd), (d, kv * hd), (heads * hd, d), (d, f), (d, f), (f, d)]
    vectors = L * (2 * d) + d  # norms (float32 always)
    # the embedding table and the output projection; a tied table is stored once, pre-transposed, and read by both
    vocab_mats = 1 if arch.get("tie_word_embeddings") else 2
    if scheme == "none":
        return F32 * (L * sum(k * n for k, n in layer_mats) + vocab_mats * v * d + vectors), 0.0
    if scheme == "int8":
        per_matrix = [k * n + F32 * n for k, n in layer_mats]
    else:  # int4 blocks of `block` along the input dimension, a float16 scale and minimum each
        per_matrix = [k * n // 2 + 2 * 2 * (k // block) * n if k % block == 0 else k * n + F32 * n
                      for k, n in layer_mats]
    vocab = vocab_mats * (v * d + F32 * v)  # INT8 per vocabulary row in both schemes
    # INT4 layer matrices are dequantized whole (their blocks run along k) into two copies; INT8 ones may be sliced
    layer = max(2 * F32 * k * n if scheme == "int4" else dequantized_slice_bytes(k, n) for k, n in layer_mats)
    transient = max(dequantized_slice_bytes(d, v), layer)  # the output projection is INT8 in both schemes
    return L * sum(per_matrix) + vocab + F32 * vectors, transient


def estimate(arch: dict, targets: list[str], lora_rank: int, *, recompute_attention: bool, recompute_layers: bool,
             loss_chunks: int, quantize_weights: str = "none", lars_basis: str = "none", lars_rank: int = 32,
             quantize_block: int = 32, attention_chunks: int = 0, attention_row_chunks: int = 0,
             cheap_recompute: bool = True) -> MemoryModel:
    """`cheap_recompute`: the bundle's exporter has the cheap_recompute pass (False: bundles before it)."""
    d, f, L = arch["hidden_size"], arch["intermediate_size"], arch["num_hidden_layers"]
    heads, vocab = arch["num_attention_heads"], arch["vocab_size"]
    head_dim = arch.get("head_dim") or d // heads
    kv = arch.get("num_key_value_heads") or heads
    stored, dequantized = weight_bytes(arch, quantize_weights, quantize_block)
    inputs, distinct = _adapter_inputs(targets, d, f)
    if lars_basis != "none":
        inputs = distinct * min(lars_rank, d)
    adapters = inputs + lora_rank * len(targets)
    # One block's activations, floats per token: residual and norm inputs, Q and the repeated K and V, gate, up and
    # the activation; and what the forward keeps of them for the backward once cheap_recompute has run (K and V
    # before the repeat; the SiLU activation, which ORT fuses into QuickGelu, recomputed from the gate's output).
    per_layer = 2 * d + 3 * heads * head_dim + 3 * f + adapters
    kept_per_layer = per_layer
    if cheap_recompute:
        silu = not str(arch.get("model_type", "")).startswith("gemma")  # Gemma's GELU is a product: not recomputed
        kept_per_layer = 2 * d + (heads + 2 * kv) * head_dim + (2 if silu else 3) * f + adapters
    chunked = loss_chunks >= 2
    # Heads whose [T, T] tensors exist at once in one layer's attention (chunked attention: one group's), and the
    # share of their query rows (row chunks: one chunk's).
    groups = min(attention_chunks, heads) if attention_chunks >= 2 else 1
    rows = max(attention_row_chunks, 1)
    chunked_attention = groups * rows >= 2
    group = -(-heads // groups) / rows
    recompute_attention = recompute_attention or chunked_attention
    # Shared by all layers: the rotary cos/sin rows of each position; a chunked loss' gradient with respect to the
    # final hidden state (computed in the forward, d per token), or the log-probabilities of the whole loss.
    shared = 2 * head_dim + (d if chunked else vocab)
    # The causal mask, T² once for all layers; with causal row chunks its blocks instead (chunk j's rows and the keys
    # before its end: (rows + 1) / 2·rows of it), cut once, after which nothing reads the whole mask.
    mask = (rows + 1) / (2 * rows) if rows >= 2 else 1
    if recompute_layers:
        saved, saved_sq = (L + 1) * d + shared, mask  # each block's input, and the last one's output (final norm)
        # the recomputed block's activations, and beside them its MLP's gradients (MLP_GRADIENTS)
        backward = per_layer + MLP_GRADIENTS * f
        backward_sq = (CHUNKED_ATTENTION_TENSORS if chunked_attention else 3) * group
    else:
        saved = L * kept_per_layer + shared
        saved_sq = mask + (0 if recompute_attention else L * heads)
        backward = MLP_GRADIENTS * f  # a layer's MLP gradients beside everything saved
        backward_sq = (CHUNKED_ATTENTION_TENSORS * group if chunked_attention else
                       3 * heads if recompute_attention else 2 * heads)
    turn = CHUNKED_LOSS_TENSORS * vocab / loss_chunks if chunked else 2 * vocab
    session = ((SESSION_BYTES["layer_recompute"] * L if recompute_layers else 0)
               + (SESSION_BYTES["attention_chunks"] * L * groups if chunked_attention else 0)
               + (SESSION_BYTES["attention_row_chunks"] * groups + SESSION_BYTES["row_chunk"]) * L * (rows - 1)
               + SESSION_BYTES.get(quantize_weights, 0) * (7 * L + 2))
    return MemoryModel(runtime=RUNTIME_BYTES + session, weights=stored + dequantized, saved_per_token=F32 * saved,
                       saved_per_token_sq=F32 * saved_sq, turn_per_token=F32 * turn,
                       backward_per_token=F32 * backward, backward_per_token_sq=F32 * backward_sq)
