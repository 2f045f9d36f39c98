"""SimplifiedLayerNormalizationGrad lowered equals the training build's kernel: the inverse RMS from the forward
SimplifiedLayerNormalization (as ORT's graph saves it), axis -1 on [B, T, H] with the scale gradient read or not
(a frozen norm's is not), axis -2 and a non-negative axis over the last two axes."""

import numpy as np
from onnx import helper

from ._testing import compare, lowered, make_model, ms, run_plain, run_reference

EPS = 1e-6
# name -> (X shape, axis, scale gradient read)
CASES = {"last": ((2, 5, 8), -1, True), "frozen": ((3, 4, 6), -1, False), "two_axes": ((3, 4, 6), -2, True),
         "axis1": ((2, 3, 5), 1, True)}


def _model(opset: int = 17):
    rng = np.random.default_rng(8)
    feeds, nodes, outputs = {}, [], []
    for name, (shape, axis, read) in CASES.items():
        norm_shape = shape[axis:]
        feeds[f"x_{name}"] = (rng.normal(size=shape) * 2 + 0.5).astype(np.float32)
        feeds[f"w_{name}"] = rng.normal(size=norm_shape).astype(np.float32)
        feeds[f"dy_{name}"] = rng.normal(size=shape).astype(np.float32)
        nodes += [helper.make_node("SimplifiedLayerNormalization", [f"x_{name}", f"w_{name}"],
                                   [f"y_{name}", f"r_{name}"], axis=axis, epsilon=EPS, stash_type=1),
                  ms("SimplifiedLayerNormalizationGrad", [f"dy_{name}", f"x_{name}", f"w_{name}", f"r_{name}"],
                     [f"dx_{name}", f"dw_{name}"], axis=axis, epsilon=EPS, stash_type=1)]
        outputs += [f"y_{name}", f"dx_{name}"] + ([f"dw_{name}"] if read else [])
    return make_model(nodes, feeds, outputs, opset=opset), feeds


def test_simplified_layer_norm_grad_matches_kernel(tmp_path):
    model, feeds = _model()
    want = run_reference(model, feeds, tmp_path)  # the kernel does not depend on the opset: one reference
    for opset, strict in ((17, False), (17, True), (18, False)):  # 18: ReduceMean takes its axes as an input
        low, counts = lowered(_model(opset)[0], strict)
        assert counts["SimplifiedLayerNormalizationGrad"] == len(CASES)
        print(f"SimplifiedLayerNormalizationGrad (opset {opset}{', strict' if strict else ''}) max abs diff",
              compare(run_plain(low, feeds), want))


def test_unread_scale_gradient_is_not_computed():
    model, _ = _model()
    low, _ = lowered(model)
    made = {o for n in low.graph.node for o in n.output}
    assert "dw_frozen" not in made and "dw_last" in made
