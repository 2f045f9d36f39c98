"""SigmoidGrad lowered equals the training build's kernel: odd shapes, Y at and near its saturation values."""

import numpy as np

from ._testing import check, make_model, ms


def test_sigmoid_grad_matches_training_kernel(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 5, 7)).astype(np.float32) * 4
    x.flat[:4] = [-30.0, 30.0, 0.0, -0.0]
    y = (1 / (1 + np.exp(-x))).astype(np.float32)
    feeds = {"dy": rng.normal(size=x.shape).astype(np.float32), "y": y}
    model = make_model([ms("SigmoidGrad", ["dy", "y"], ["dx"])], feeds, ["dx"])
    diffs = check(model, feeds, tmp_path, "SigmoidGrad", strict_too=False)
    print("SigmoidGrad max abs diff", diffs)
