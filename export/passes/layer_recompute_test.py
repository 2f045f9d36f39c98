"""Layer recompute on a two-block residual model exported like the real ones (TorchScript, blocks named layers.N):
gradients equal PyTorch autograd's, and after the pass the backward keeps only what enters and leaves each block,
in the stored graph and in the graph ORT optimises and runs."""

import numpy as np
import onnx

from lars_export.passes import PassContext
from lars_export.passes._testing import lora_linear, ort_train_step, saved, training_artifacts
from lars_export.passes.layer_recompute import LAYER_RECOMPUTE, _layer_of

D, F, R, V, T = 6, 10, 2, 9, 5
TRAINABLE = {f"layers.{i}.{m}.lora_{ab}.default.weight" for i in (0, 1) for m in ("up", "down") for ab in "AB"}


def _model(rng):
    import torch

    class Block(torch.nn.Module):  # x + down(silu(up(x)) * x·G): activations the backward needs
        def __init__(self):
            super().__init__()
            self.up, self.down = lora_linear(D, F, R), lora_linear(F, D, R)
            self.gate = torch.nn.Linear(D, F, bias=False)

        def forward(self, x):
            return x + self.down(torch.nn.functional.silu(self.up(x)) * self.gate(x))

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(20, D)
            self.layers = torch.nn.ModuleList([Block(), Block()])
            self.head = torch.nn.Linear(D, V, bias=False)

        def forward(self, ids):
            x = self.embed(ids)
            for layer in self.layers:
                x = layer(x)
            return self.head(x)

    model = Tiny()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.from_numpy(rng.normal(size=tuple(p.shape)).astype(np.float32) * 0.5))
    return model



def _kept_inside_blocks(model) -> list[str]:
    """Saved tensors made inside a block other than the block's output (what flows to the next block)."""
    later_readers = {}
    for node in model.graph.node:
        for t in node.input:
            later_readers.setdefault(t, set()).add(_layer_of(node))
    out = []
    for t, made_by in saved(model).items():
        layer = _layer_of(made_by)
        if layer is None or made_by.op_type in ("Transpose",):  # weight transposes of the adapters: [d, r]
            continue
        if not any(other is None or other > layer for other in later_readers.get(t, ())):
            out.append(t)
    return sorted(out)


def test_recomputed_blocks_give_autograd_gradients_and_keep_only_block_inputs(tmp_path):
    import torch

    rng = np.random.default_rng(0)
    model = _model(rng)
    training_artifacts(model, TRAINABLE, tmp_path, T)
    training = onnx.load(str(tmp_path / "training_model.onnx"))
    assert len(_kept_inside_blocks(training)) >= 4  # the check can fail: each block keeps its activations
    report = LAYER_RECOMPUTE.run(training, PassContext(trainable=TRAINABLE))
    assert report.changed == 2 and report.skipped == []
    assert _kept_inside_blocks(training) == []
    onnx.save(training, str(tmp_path / "training_model.onnx"))

    ids = rng.integers(0, 20, size=T).astype(np.int64)
    labels = rng.integers(0, V, size=T).astype(np.int64)
    ours, grads = ort_train_step(tmp_path, [ids, labels], optimized_to=tmp_path / "optimized.onnx")
    loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(ids)), torch.from_numpy(labels))
    loss.backward()
    params = dict(model.named_parameters())
    np.testing.assert_allclose(ours, loss.item(), rtol=1e-5)
    for name in sorted(TRAINABLE):
        np.testing.assert_allclose(grads[name], params[name].grad.numpy(), rtol=1e-4, atol=1e-6, err_msg=name)

    # The graph ORT runs: the copies survived its common-subexpression elimination.
    optimized = onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False)
    assert _kept_inside_blocks(optimized) == []


def test_a_copy_gates_only_the_inputs_it_would_not_otherwise_wait_for():
    """The residual stream is gated; a shared tensor read beside a waiting one (the mask next to the scores) is not;
    one read alone (the rotary table unsqueezed before it meets Q) is."""
    import onnx_ir as ir

    from lars_export.passes.layer_recompute import _to_gate

    values = {}

    def node(op, inputs, output):
        made = ir.node(op, [values.setdefault(i, ir.Value(name=i)) for i in inputs], outputs=[ir.Value(name=output)])
        values[output] = made.outputs[0]
        return made

    nodes = [node("Add", ["residual", "bias"], "h"), node("Add", ["h", "mask"], "scores"),
             node("Unsqueeze", ["cos", "axes"], "cos4"), node("Mul", ["scores", "cos4"], "out")]
    names = lambda gated: [v.name for v in gated]  # noqa: E731
    assert names(_to_gate(nodes, {values[t] for t in ("residual", "mask", "cos")})) == ["cos", "residual"]
    # nothing waits yet: all of the node's externals
    assert names(_to_gate(nodes[1:2], {values["h"], values["mask"]})) == ["h", "mask"]
