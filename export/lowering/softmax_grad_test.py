"""SoftmaxGrad_13 lowered equals the training build's kernel: last, middle and first axes, odd shapes."""

import numpy as np
from onnx import helper

from ._testing import check, make_model, ms

CASES = {"last": ((2, 3, 7), -1), "middle": ((2, 5, 3, 4), 1), "first": ((5, 3), 0)}


def test_softmax_grad_matches_training_kernel(tmp_path):
    rng = np.random.default_rng(0)
    feeds, nodes, outputs = {}, [], []
    for name, (shape, axis) in CASES.items():
        feeds[f"x_{name}"] = rng.normal(size=shape).astype(np.float32) * 3
        feeds[f"dy_{name}"] = rng.normal(size=shape).astype(np.float32)
        nodes += [helper.make_node("Softmax", [f"x_{name}"], [f"y_{name}"], axis=axis),
                  ms("SoftmaxGrad_13", [f"dy_{name}", f"y_{name}"], [f"dx_{name}"], axis=axis)]
        outputs.append(f"dx_{name}")
    diffs = check(make_model(nodes, feeds, outputs), feeds, tmp_path, "SoftmaxGrad_13", strict_too=False)
    print("SoftmaxGrad_13 max abs diff", diffs)
