"""What the passes' sibling tests share: a LoRA linear in PEFT's parameter layout, and one step of ORT's training
Module."""

from __future__ import annotations


def lora_linear(d_in: int, d_out: int, rank: int, scale: float = 2.0):
    """A torch module y = x·Wᵀ + scale·(x·Aᵀ)·Bᵀ named like PEFT's (base_layer, lora_A.default, lora_B.default)."""
    import torch

    class LoraLinear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.base_layer = torch.nn.Linear(d_in, d_out, bias=False)
            self.lora_A = torch.nn.ModuleDict({"default": torch.nn.Linear(d_in, rank, bias=False)})
            self.lora_B = torch.nn.ModuleDict({"default": torch.nn.Linear(rank, d_out, bias=False)})

        def forward(self, x):
            return self.base_layer(x) + self.lora_B["default"](self.lora_A["default"](x)) * scale

    return LoraLinear()


def saved(model) -> dict:
    """Name of each value a training graph (ModelProto or onnx_ir) keeps for the backward -> the onnx_ir node that
    makes it (the walk the passes use: _ir.saved_for_backward)."""
    from ._ir import ir_graph, saved_for_backward

    return {value.name: value.producer() for value in saved_for_backward(ir_graph(model))}


def ort_train_step(directory, feeds, optimized_to=None, priority_order: bool = True):
    """(loss, {trainable: gradient}) of one training step of ORT's own artifacts in `directory` on `feeds` (arrays in
    the order of the graph's user inputs), run by onnxruntime-training 1.19.2 in a child process
    (lars_export.ort_training) with the runtime's session options; optionally dump the graph ORT optimised and ran
    to `optimized_to`."""
    import tempfile
    from pathlib import Path

    import numpy as np
    import onnx

    from lars_export import ort_training

    directory = Path(directory)
    graph = onnx.load(str(directory / "training_model.onnx"), load_external_data=False)
    names = [i.name for i in graph.graph.input][: len(feeds)]
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(Path(tmp) / "feeds.npz", **dict(zip(names, feeds)))
        trainable = ort_training.call("train_steps", directory, None, Path(tmp) / "feeds.npz", 1, 0.0,
                                      Path(tmp) / "out.npz", None, priority_order,
                                      str(optimized_to) if optimized_to else None)
        out = np.load(Path(tmp) / "out.npz")
        return float(out["loss"][0]), {n: out[f"grad:{n}"][0] for n in trainable}


TWO_BLOCK_TRAINABLE = {f"layers.{i}.{m}.lora_{ab}.default.weight" for i in (0, 1) for m in ("up", "down")
                       for ab in "AB"}


def two_block_lm(rng, d: int, f: int, rank: int, vocab: int, out: int):
    """A causal-LM-shaped torch model: Embedding(vocab, d) -> two residual blocks x + down(silu(up(x)) · gate(x))
    named layers.N (LoRA on up and down, gate frozen) -> lm_head to `out` logits, flattened to [batch·T, out] as
    lars' exporter flattens them. Weights drawn from `rng`."""
    import numpy as np
    import torch

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = lora_linear(d, f, rank), lora_linear(f, d, rank)
            self.gate = torch.nn.Linear(d, f, bias=False)

        def forward(self, x):
            return x + self.down(torch.nn.functional.silu(self.up(x)) * self.gate(x))

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(vocab, d)
            self.layers = torch.nn.ModuleList([Block(), Block()])
            self.lm_head = torch.nn.Linear(d, out, bias=False)

        def forward(self, ids):
            x = self.embed(ids)
            for layer in self.layers:
                x = layer(x)
            return self.lm_head(x).reshape(-1, out)

    model = Tiny()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.from_numpy(rng.normal(size=tuple(p.shape)).astype(np.float32) * 0.3))
    return model


def export_lm(model, path):
    """TorchScript export as lars' exporter does it: ids [batch, T] -> logits, opset 17, no constant folding."""
    import onnx
    import torch

    torch.onnx.export(model, (torch.zeros((1, 5), dtype=torch.int64),), str(path), input_names=["ids"],
                      output_names=["logits"], dynamic_axes={"ids": {0: "B", 1: "T"}, "logits": {0: "BT"}},
                      opset_version=17, do_constant_folding=False, dynamo=False)
    return onnx.load(str(path))


def export_sequence_model(model, path, length: int):
    """TorchScript export of a model taking ids [T] (the attention tests' models): opset 17, no constant folding."""
    import onnx
    import torch

    torch.onnx.export(model, (torch.zeros(length, dtype=torch.int64),), str(path), input_names=["ids"],
                      output_names=["logits"], dynamic_axes={"ids": {0: "T"}, "logits": {0: "T"}}, opset_version=17,
                      do_constant_folding=False, dynamo=False)
    return onnx.load(str(path))


def training_artifacts(model, trainable, directory, length: int) -> None:
    """ORT's training artifacts of a model taking ids [T], with `trainable` (names) trained, written to `directory`."""
    from pathlib import Path

    from lars_export import training_graphs

    training_graphs.generate(export_sequence_model(model, Path(directory) / "fwd.onnx", length), sorted(trainable),
                             directory)


def attention_lm(rng, d: int, heads: int, rank: int, vocab: int, out: int, adapted=("q_proj",), squash=False):
    """Embedding(vocab, d) -> one causal attention block written like transformers' eager attention ((Q·Kᵀ)·scale +
    mask -> softmax -> ·V, the mask computed outside the block) with LoRA on the `adapted` projections -> a head to
    `out` logits. ids [T] -> [T, out]. `squash` puts a tanh between the scores and the softmax (a chain the
    attention passes do not handle)."""
    import numpy as np
    import torch

    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name in ("q_proj", "k_proj", "v_proj"):
                setattr(self, name, lora_linear(d, d, rank) if name in adapted else torch.nn.Linear(d, d, bias=False))

        def forward(self, x, mask):
            t = x.shape[0]
            q, k, v = (p(x).view(t, heads, d // heads).transpose(0, 1)
                       for p in (self.q_proj, self.k_proj, self.v_proj))
            scores = torch.matmul(q, k.transpose(1, 2)) * (d // heads) ** -0.5 + mask
            if squash:
                scores = torch.tanh(scores)
            return torch.matmul(torch.softmax(scores, dim=-1), v).transpose(0, 1).reshape(t, d)

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(vocab, d)
            self.attn = Attention()
            self.head = torch.nn.Linear(d, out, bias=False)

        def forward(self, ids):
            t = ids.shape[0]
            causal = torch.triu(torch.full((t, t), -1e9), diagonal=1)
            return self.head(self.attn(self.embed(ids), causal))

    model = Tiny()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.from_numpy(rng.normal(size=tuple(p.shape)).astype(np.float32)))
    return model
