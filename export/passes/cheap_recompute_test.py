"""Cheap recompute on a decoder block exported like the real models (TorchScript): grouped-query attention with
transformers' repeat_kv and a SiLU-gated MLP, LoRA on q, k, v, gate and up, differentiated by ORT itself. Gradients
equal PyTorch autograd's and the exact graph's; the backward keeps neither the MLP activation nor the repeated keys
and values, in the stored graph and in the graph ORT optimises and runs."""

import numpy as np
import onnx
import pytest

from lars_export.passes import PASSES, PassContext
from lars_export.passes._ir import gate_of, ir_graph, values_by_name
from lars_export.passes._testing import lora_linear, ort_train_step, saved, training_artifacts
from lars_export.passes.cheap_recompute import CHEAP_RECOMPUTE, find_chain

D, H, KV, F, R, V, T = 16, 4, 2, 24, 2, 11, 6
TRAINABLE = {f"block.{m}.lora_{ab}.default.weight" for m in ("q_proj", "k_proj", "v_proj", "gate", "up") for ab in "AB"}


def _model(rng):
    import torch

    hd = D // H

    def repeat_kv(h):  # transformers' repeat_kv: [b, kv, t, hd] -> [b, heads, t, hd]
        b, kv, t, d = h.shape
        return h[:, :, None, :, :].expand(b, kv, H // KV, t, d).reshape(b, kv * (H // KV), t, d)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = lora_linear(D, D, R)
            self.k_proj, self.v_proj = lora_linear(D, KV * hd, R), lora_linear(D, KV * hd, R)
            self.gate, self.up = lora_linear(D, F, R), lora_linear(D, F, R)
            self.down = torch.nn.Linear(F, D, bias=False)

        def forward(self, x, mask):
            t = x.shape[0]
            q = self.q_proj(x).view(1, t, H, hd).transpose(1, 2)
            k, v = (repeat_kv(p(x).view(1, t, KV, hd).transpose(1, 2)) for p in (self.k_proj, self.v_proj))
            scores = torch.matmul(q, k.transpose(2, 3)) * hd ** -0.5 + mask
            x = x + torch.matmul(torch.softmax(scores, dim=-1), v).transpose(1, 2).reshape(t, D)
            return x + self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(20, D)
            self.block = Block()
            self.head = torch.nn.Linear(D, V, bias=False)

        def forward(self, ids):
            t = ids.shape[0]
            return self.head(self.block(self.embed(ids), torch.triu(torch.full((t, t), -1e9), diagonal=1)))

    model = Tiny()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.from_numpy(rng.normal(size=tuple(p.shape)).astype(np.float32) * 0.5))
    return model


def _kept(model) -> list[str]:
    """Op types of the tensors the backward keeps whose chains the pass recomputes."""
    return sorted(made_by.op_type for made_by in saved(model).values() if made_by.op_type in ("QuickGelu", "Expand"))


def test_recomputed_activation_and_repeated_kv_give_autograd_gradients(tmp_path):
    import torch

    rng = np.random.default_rng(0)
    model = _model(rng)
    training_artifacts(model, TRAINABLE, tmp_path, T)
    ids = rng.integers(0, 20, size=T).astype(np.int64)
    labels = rng.integers(0, V, size=T).astype(np.int64)
    exact_loss, exact = ort_train_step(tmp_path, [ids, labels])

    training = onnx.load(str(tmp_path / "training_model.onnx"))
    # The exact graph keeps the MLP activation and the repeated values (Expand) and keys (their Transpose).
    assert _kept(training) == ["Expand", "QuickGelu"]
    report = CHEAP_RECOMPUTE.run(training, PassContext(trainable=TRAINABLE))
    assert report.skipped == [] and report.changed == 3
    assert report.details["chains"] == {"QuickGelu": 1, "Expand": 1, "Expand+Reshape+Transpose": 1}
    assert _kept(training) == []
    # Every copy starts from a gated tensor: it cannot run with the forward.
    values = values_by_name(ir_graph(training))
    copies = [n for n in training.graph.node if ".recompute" in n.output[0]]
    starts = [n for n in copies if ".recompute" not in n.input[0]]
    assert len(copies) == 6 and len(starts) == 3  # QuickGelu; Expand (+ the Reshape view); Expand, Reshape, Transpose
    assert all(gate_of(values[n.input[0]]) is not None for n in starts)
    onnx.save(training, str(tmp_path / "training_model.onnx"))
    loss, grads = ort_train_step(tmp_path, [ids, labels])

    logits = model(torch.from_numpy(ids))
    torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels)).backward()
    params = dict(model.named_parameters())
    assert loss == exact_loss
    for name in TRAINABLE:
        reference = params[name].grad.numpy()
        np.testing.assert_allclose(grads[name], reference, rtol=1e-4, atol=1e-5 * np.abs(reference).max())
        np.testing.assert_array_equal(grads[name], exact[name])  # same kernels on the same values

    # The graph ORT runs: no fusion or common-subexpression elimination undid it.
    ort_train_step(tmp_path, [ids, labels], optimized_to=tmp_path / "optimized.onnx")
    optimized = onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False)
    assert sum(n.op_type == "QuickGelu" for n in optimized.graph.node) == 2  # forward + recompute
    assert _kept(optimized) == []


def _graph(*nodes):
    """onnx_ir values by name of a chain of (op, inputs, output) nodes: graph inputs made as the chain reads them."""
    import onnx_ir as ir

    values = {}
    for op, inputs, output in nodes:
        node = ir.node(op, [values.setdefault(i, ir.Value(name=i)) for i in inputs], outputs=[ir.Value(name=output)])
        values[output] = node.outputs[0]
    return values


@pytest.mark.parametrize("kept_anyway, expected", [
    (set(), ([], None)),                       # a Transpose alone would keep as much as it frees
    ({"a"}, (["Transpose"], "a")),             # its input is kept anyway: free
])
def test_a_chain_needs_a_kept_source_or_a_broadcast(kept_anyway, expected):
    values = _graph(("MatMul", ["x", "w"], "a"), ("Transpose", ["a"], "at"))
    chain, source = find_chain(values["at"], {values[t]: [] for t in kept_anyway | {"at"}}, set())
    assert ([n.op_type for n in chain], source.name if source else None) == expected


def test_a_broadcast_chain_keeps_the_input_of_its_topmost_expand():
    values = _graph(("MatMul", ["x", "w"], "k"), ("Unsqueeze", ["k", "axes"], "k1"), ("Expand", ["k1", "shape"], "ke"),
                    ("Reshape", ["ke", "shape2"], "kr"), ("Transpose", ["kr"], "kt"))
    chain, source = find_chain(values["kt"], {values["kt"]: []}, set())
    assert [n.op_type for n in chain] == ["Expand", "Reshape", "Transpose"] and source.name == "k1"


def test_runs_after_layer_recompute():
    names = [p.name for p in PASSES]
    assert names.index("cheap_recompute") > names.index("layer_recompute")
    assert next(p for p in PASSES if p.name == "cheap_recompute").switch is None  # exact and free: always on
