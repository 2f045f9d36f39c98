"""LARS on whole models: k = d is exact LoRA, and after the pass no adapter input has a backward consumer."""

import onnx
import pytest

from lars_artifacts import load_bundle
from lars_export.passes._ir import backward_nodes, ir_graph, values_by_name, view_chain
from lars_export.passes._testing import saved
from lars_ort import Trainer
from tiny import compare_with_peft


def _export(model_dir, out, **kw):
    from lars_export import ExportConfig, export

    return export(ExportConfig(model=str(model_dir), out=str(out), lora_rank=4, lora_alpha=8, **kw))


@pytest.fixture(scope="module")
def lars_bundles(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("lars")
    return {
        # k >= every adapter input width (64, and 128 for down_proj): P is square and orthogonal, so exact
        "full": _export(tiny_models["llama"], root / "full", lars_basis="pca", lars_rank=128),
        "pca8": _export(tiny_models["llama"], root / "pca8", lars_basis="pca", lars_rank=8),
        "random8": _export(tiny_models["qwen2"], root / "random8", lars_basis="random", lars_rank=8),
    }


def adapter_inputs(model) -> set[str]:
    by_input = {}
    for n in model.graph.node:
        for i in n.input:
            by_input.setdefault(i, []).append(n)
    inputs = set()
    for init in model.graph.input:
        if ".lora_A." in init.name:
            for t in by_input.get(init.name, []):
                inputs.update(m.input[0] for m in by_input.get(t.output[0], []) if m.op_type == "MatMul")
    return inputs


def test_full_rank_lars_reproduces_exact_lora_gradients(tiny_models, lars_bundles):
    compare_with_peft(tiny_models["llama"], lars_bundles["full"])


@pytest.mark.parametrize("which", ["pca8", "random8"])
def test_no_adapter_input_has_a_backward_consumer(lars_bundles, tiny_bundles, which):
    lars = onnx.load(str(lars_bundles[which] / "training_model.onnx"), load_external_data=False)
    inputs = adapter_inputs(lars)
    assert len(inputs) == 2 * 4  # per layer: attention input, attention output, MLP input, MLP hidden
    # No backward node reads an x: each x feeds its projection x·P, which runs in the forward.
    assert {n.name for n in backward_nodes(ir_graph(lars)) if inputs & {v.name for v in n.inputs if v}} == set()
    projections = [n for n in lars.graph.node if n.name.endswith("/Project")]
    assert {n.input[0] for n in projections} == inputs
    # The check can fail: in the exact bundle every adapter input feeds its LoRA-A gradient.
    exact = onnx.load(str(tiny_bundles["llama"] / "training_model.onnx"), load_external_data=False)
    exact_inputs = adapter_inputs(exact)
    values = values_by_name(ir_graph(exact))
    buffers = {view_chain(values[x])[-1].name for x in exact_inputs}  # o_proj's x is a view
    assert exact_inputs and buffers <= set(saved(exact))


def test_low_rank_bundles_train_and_record_their_basis(lars_bundles):
    for which, basis in (("pca8", "pca"), ("random8", "random")):
        bundle = load_bundle(lars_bundles[which])
        assert bundle.manifest.adapter["lars"]["basis"] == basis and bundle.manifest.adapter["lars"]["rank"] == 8
        report = next(p for p in bundle.manifest.passes if p["name"] == "lars_projection")
        assert report["changed"] == 2 * 7 and report["details"]["distinct_inputs"] == 8
        trainer = Trainer(bundle)
        batch = trainer.text_batch(["Who's there? Nay, answer me: stand, and unfold yourself."] * 2)
        before = trainer.evaluate([batch])["eval_loss"]
        for _ in range(6):
            trainer.step(batch, lr=3e-3)
        assert trainer.evaluate([batch])["eval_loss"] < before
