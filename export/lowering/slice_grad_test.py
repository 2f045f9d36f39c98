"""SliceGrad lowered (Pad) equals the training build's kernel: positive, negative, clamped (±huge) starts and
ends, negative axes, no axes/steps inputs, int32 indices, steps of 1 given explicitly; at opset 17 (pads built with
ScatterElements) and 18 (Pad's axes input). Other steps raise a one-line error naming the node."""

import numpy as np
import pytest
from onnx import helper

from lars_artifacts import LarsError

from ._testing import compare, lowered, make_model, ms, run_plain, run_reference

BIG = np.iinfo(np.int64).max
SHAPE = (4, 6, 5)
# name -> (starts, ends, axes or None, steps or None, index dtype)
CASES = {
    "tail": ([1], [BIG], [1], [1], np.int64),
    "negative": ([-3], [-1], [-1], None, np.int64),
    "clamped": ([-100], [100], [0], None, np.int64),
    "clamped_end": ([2], [1000], [2], [1], np.int64),
    "no_axes": ([0, 1], [2, 4], None, None, np.int64),
    "int32": ([1, -4], [3, -1], [0, -2], [1, 1], np.int32),
    "empty": ([3], [1], [1], None, np.int64),
}


def _dy_shape(starts, ends, axes):
    shape = list(SHAPE)
    axes = axes if axes is not None else list(range(len(starts)))
    for s, e, a in zip(starts, ends, axes):
        dim = SHAPE[a]
        s, e = (s + dim if s < 0 else s), (e + dim if e < 0 else e)
        s, e = min(max(s, 0), dim), min(max(e, 0), dim)
        shape[a] = max(e - s, 0)
    return shape


def _model(opset: int):
    rng = np.random.default_rng(5)
    feeds, nodes, outputs, inits = {}, [], [], {"shape": np.array(SHAPE, np.int64)}
    for name, (starts, ends, axes, steps, dtype) in CASES.items():
        feeds[f"dy_{name}"] = rng.normal(size=_dy_shape(starts, ends, axes)).astype(np.float32)
        inputs = [f"dy_{name}", "shape"]
        for part, values in (("starts", starts), ("ends", ends), ("axes", axes), ("steps", steps)):
            if values is None:
                inputs.append("")
                continue
            inits[f"{part}_{name}"] = np.array(values, dtype)
            inputs.append(f"{part}_{name}")
        while inputs[-1] == "":
            inputs.pop()
        nodes.append(ms("SliceGrad", inputs, [f"dx_{name}"]))
        outputs.append(f"dx_{name}")
    return make_model(nodes, feeds, outputs, inits, opset=opset), feeds


def test_slice_grad_matches_kernel(tmp_path):
    model, feeds = _model(17)
    want = run_reference(model, feeds, tmp_path)  # the kernel does not depend on the opset: one reference
    for opset in (17, 18):
        low, counts = lowered(_model(opset)[0])
        assert counts == {"SliceGrad": len(CASES)}
        assert any(n.op_type == "ScatterElements" for n in low.graph.node) == (opset < 18)
        print(f"SliceGrad (opset {opset}) max abs diff", compare(run_plain(low, feeds), want))


def _one(steps_input, inits):
    feeds = {"dy": np.zeros((4, 3, 5), np.float32)}
    node = ms("SliceGrad", ["dy", "shape", "st", "en", "ax", steps_input], ["dx"])
    return make_model([node], feeds, ["dx"], {"shape": np.array(SHAPE, np.int64), "st": np.array([0]),
                                               "en": np.array([6]), "ax": np.array([1]), **inits})


def test_other_steps_raise_naming_the_node():
    with pytest.raises(LarsError, match=r"SliceGrad:dx.*steps are \[2\]") as error:
        lowered(_one("steps", {"steps": np.array([2])}))
    assert "\n" not in str(error.value)
    model = _one("steps_in", {})
    model.graph.input.append(helper.make_tensor_value_info("steps_in", 7, [1]))
    with pytest.raises(LarsError, match="not a constant"):
        lowered(model)
