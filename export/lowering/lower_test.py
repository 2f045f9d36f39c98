"""lower_training_step on real bundles: tiny Llama and Qwen2 exported with the pass combinations we ship (exact;
the default passes with a random LARS basis; the memory stack; int4 weights). The lowered step, on plain
onnxruntime, gives the loss and every gradient ORT's own training Module gives (one step, random adapter values),
with and without strict; no training op (strict: no com.microsoft op) remains."""

import json
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest

from lars_artifacts import TRAINING_MODEL

from . import lower_training_step
from ._testing import TRAINING_OPS

ARCHS = ("llama", "qwen2")
COMBOS = {
    "exact": dict(lars_basis="none", recompute_attention=False, loss_chunks=0),
    "default": dict(lars_basis="random", lars_rank=16),
    "stack": dict(lars_basis="none", attention_chunks=4, attention_row_chunks=2, recompute_layers=True,
                  loss_chunks=3, quantize_weights="int8"),
    "int4": dict(lars_basis="none", quantize_weights="int4"),
}
LOSS_RTOL = 1e-6
GRAD_ATOL, GRAD_RTOL_OF_MAX, COS_TOL = 4e-8, 1e-5, 1e-9
TESTS_DIR = Path(__file__).resolve().parents[2] / "tests"

# One child per architecture: build the tiny model, export its four bundles (two children run at once).
EXPORT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from tiny import build_model
    from lars_export import ExportConfig, export
    root = Path({root!r})
    model = build_model({arch!r}, root / "model")
    for name, kw in json.loads({combos!r}).items():
        export(ExportConfig(model=str(model), out=str(root / name), lora_rank=4, lora_alpha=8, force=True, **kw))
""")


def _feeds(rng, vocab: int = 384, batch: int = 2, seq: int = 13) -> dict:
    ids = rng.integers(1, vocab, size=(batch, seq)).astype(np.int64)
    mask = np.ones((batch, seq), np.int64)
    mask[1, -4:] = 0  # right padding
    labels = np.full((batch, seq), -100, np.int64)
    labels[:, :-1] = ids[:, 1:]
    labels[mask == 0] = -100
    labels[1, -5] = -100
    labels[:, :3] = -100  # a prompt
    return {"input_ids": ids, "attention_mask": mask, "labels": labels.reshape(-1)}


def _adapters(model, rng) -> dict:
    """Random values of every trainable input (LoRA B too: with B = 0 every A gradient is 0 and hides errors)."""
    out = {}
    for i in model.graph.input:
        if i.name.endswith(".weight"):
            shape = [d.dim_value for d in i.type.tensor_type.shape.dim]
            out[i.name] = (rng.standard_normal(shape) * 0.1).astype(np.float32)
    return out


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """(arch, combo) -> (bundle dir, trainable names, feeds, adapter values, ORT Module's loss and gradients)."""
    from lars_export import ort_training

    root = tmp_path_factory.mktemp("lowering_bundles")
    children = []
    for arch in ARCHS:
        code = EXPORT.format(tests=str(TESTS_DIR), root=str(root / arch), arch=arch, combos=json.dumps(COMBOS))
        children.append(subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE, text=True))
    for child in children:
        _, err = child.communicate()
        assert child.returncode == 0, err.strip().splitlines()[-1:]

    def reference(key):
        arch, combo = key
        bundle = root / arch / combo
        model = onnx.load(str(bundle / TRAINING_MODEL), load_external_data=False)
        rng = np.random.default_rng(len(arch) * 10 + len(combo))
        feeds, values = _feeds(rng), _adapters(model, rng)
        feeds_path, out_path = bundle / "lowering_feeds.npz", bundle / "lowering_reference.npz"
        np.savez(feeds_path, **feeds, **{f"param:{n}": v for n, v in values.items()})
        ort_training.call("train_steps", bundle, None, feeds_path, 1, 0.0, out_path)
        # `trainable` in reverse graph order: the lowered inputs and gradient outputs follow the order given
        return key, (bundle, list(reversed(values)), feeds, values, dict(np.load(out_path)))

    keys = [(arch, combo) for arch in ARCHS for combo in COMBOS]
    with ThreadPoolExecutor(2) as pool:
        return dict(pool.map(reference, keys))


@pytest.mark.parametrize("strict", [False, True], ids=["plain", "strict"])
@pytest.mark.parametrize("combo", list(COMBOS))
@pytest.mark.parametrize("arch", ARCHS)
def test_lowered_step_matches_ort_training(bundles, arch, combo, strict):
    import onnxruntime

    bundle, trainable, feeds, values, want = bundles[arch, combo]
    model = onnx.load(str(bundle / TRAINING_MODEL), load_external_data=False)
    report = lower_training_step(model, trainable, strict=strict)
    assert report.to_dict()["lowered"].get("InPlaceAccumulatorV2") == len(trainable)
    for node in model.graph.node:
        assert node.op_type not in TRAINING_OPS, node.name
        if strict:
            assert (node.domain or "") == "", (node.domain, node.op_type)
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask", "labels", *trainable]
    names = [o.name for o in model.graph.output]
    assert names[-len(trainable):] == [f"{p}_grad" for p in trainable]
    # beside weights.onnx_data, which it references (plain ORT refuses external data reached through a symlink)
    path = bundle / f"lowered_{'strict' if strict else 'plain'}.onnx"
    onnx.save(model, str(path))
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    got = dict(zip(names, session.run(names, {**feeds, **values})))

    loss, ref_loss = float(got[names[0]]), float(want["loss"][0])
    assert abs(loss - ref_loss) <= LOSS_RTOL * abs(ref_loss), (loss, ref_loss)
    worst, worst_of_max = 0.0, 0.0
    for p in trainable:
        g, r = got[f"{p}_grad"].astype(np.float64), want[f"grad:{p}"][0].astype(np.float64)
        assert g.shape == r.shape, p
        diff = float(np.abs(g - r).max())
        worst, worst_of_max = max(worst, diff), max(worst_of_max, diff / float(np.abs(r).max()))
        assert diff <= max(GRAD_ATOL, GRAD_RTOL_OF_MAX * float(np.abs(r).max())), (p, diff)
        cosine = float((g * r).sum() / (np.linalg.norm(g) * np.linalg.norm(r)))
        assert cosine >= 1 - COS_TOL, (p, cosine)
    print(f"{arch}/{combo}/{'strict' if strict else 'plain'}: |dloss|/loss {abs(loss - ref_loss) / ref_loss:.2g}, "
          f"max |dgrad| {worst:.3g} ({worst_of_max:.2g} of the gradient's max)")


def test_lowering_leaves_the_bundle_alone(bundles):
    """Lowering reads the graph without its external data and writes none: initializers keep their references."""
    bundle = bundles["llama", "stack"][0]
    model = onnx.load(str(bundle / TRAINING_MODEL), load_external_data=False)
    external = {i.name: list(i.external_data) for i in model.graph.initializer
                if i.data_location == onnx.TensorProto.EXTERNAL}
    lower_training_step(model, bundles["llama", "stack"][1])
    after = {i.name: list(i.external_data) for i in model.graph.initializer
             if i.data_location == onnx.TensorProto.EXTERNAL}
    assert external and after == external



def test_unknown_ops_raise_one_line_naming_the_node():
    from onnx import helper

    from lars_artifacts import LarsError

    from ._testing import lowered, make_model, ms

    feeds = {"x": np.zeros((2, 3), np.float32), "dy": np.zeros((2, 3), np.float32)}
    model = make_model([ms("ReluGrad", ["dy", "x"], ["dx"])], feeds, ["dx"])
    with pytest.raises(LarsError, match=r"^cannot lower node 'ReluGrad:dx' \(com.microsoft:ReluGrad\): no lowering "
                                        r"rule for this op, and it is not one plain onnxruntime runs$"):
        lowered(model)
    gelu = make_model([ms("Gelu", ["x"], ["y"])], feeds, ["y"])
    with pytest.raises(LarsError, match="strict: only standard ONNX ops may remain"):
        lowered(gelu, strict=True)
    inner = helper.make_graph([ms("QuickGeluGrad", ["dy", "x"], ["dz"])], "body", [],
                              [helper.make_tensor_value_info("dz", 1, None)])
    branchy = make_model([helper.make_node("Constant", [], ["c"], value_int=1),
                          helper.make_node("Cast", ["c"], ["b"], to=9),
                          helper.make_node("If", ["b"], ["dx"], then_branch=inner, else_branch=inner)],
                         feeds, ["dx"])
    with pytest.raises(LarsError, match="subgraphs are not lowered"):
        lowered(branchy)
    missing = make_model([ms("SigmoidGrad", ["dy", ""], ["dx"])], feeds, ["dx"])
    with pytest.raises(LarsError, match=r"^cannot lower node 'SigmoidGrad:dx' \(com.microsoft:SigmoidGrad\): it lacks "
                                        r"dY or Y$"):
        lowered(missing)
