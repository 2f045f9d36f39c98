"""SimplifiedLayerNormalization, expanded with strict=True, equals the training build's kernel (output and the
saved inverse RMS, read or not; axes -1, -2 and 1); without strict it is kept."""

import numpy as np
from onnx import helper

from ._testing import compare, lowered, make_model, run_plain, run_reference

CASES = {"last": ((2, 5, 8), -1, True, 1e-6), "no_inv": ((3, 7), -1, False, 1e-5),
         "two_axes": ((3, 4, 6), -2, True, 1e-6), "axis1": ((2, 3, 5), 1, True, None)}


def _model(opset: int = 17):
    rng = np.random.default_rng(9)
    feeds, nodes, outputs = {}, [], []
    for name, (shape, axis, inv, eps) in CASES.items():
        feeds[f"x_{name}"] = (rng.normal(size=shape) * 2).astype(np.float32)
        feeds[f"w_{name}"] = rng.normal(size=shape[axis:]).astype(np.float32)
        outs = [f"y_{name}"] + ([f"r_{name}"] if inv else [])
        attrs = {"axis": axis, **({} if eps is None else {"epsilon": eps})}
        nodes.append(helper.make_node("SimplifiedLayerNormalization", [f"x_{name}", f"w_{name}"], outs, **attrs))
        outputs += outs
    return make_model(nodes, feeds, outputs, opset=opset), feeds


def test_kept_without_strict():
    low, counts = lowered(_model()[0], strict=False)
    assert counts == {} and {n.op_type for n in low.graph.node} == {"SimplifiedLayerNormalization"}


def test_strict_matches_kernel(tmp_path):
    model, feeds = _model()
    want = run_reference(model, feeds, tmp_path)  # the kernel does not depend on the opset: one reference
    for opset in (17, 18):  # 18: ReduceMean takes its axes as an input
        low, counts = lowered(_model(opset)[0], strict=True)
        assert counts == {"SimplifiedLayerNormalization": len(CASES)}
        print(f"SimplifiedLayerNormalization (strict, opset {opset}) max abs diff",
              compare(run_plain(low, feeds), want))
