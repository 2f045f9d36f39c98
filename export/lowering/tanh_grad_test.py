"""TanhGrad lowered equals the training build's kernel: odd shapes, Y at and near its saturation values."""

import numpy as np

from ._testing import check, make_model, ms


def test_tanh_grad_matches_training_kernel(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 5, 7)).astype(np.float32) * 4
    x.flat[:4] = [-30.0, 30.0, 0.0, -0.0]
    y = np.tanh(x).astype(np.float32)
    feeds = {"dy": rng.normal(size=x.shape).astype(np.float32), "y": y}
    model = make_model([ms("TanhGrad", ["dy", "y"], ["dx"])], feeds, ["dx"])
    diffs = check(model, feeds, tmp_path, "TanhGrad", strict_too=False)
    print("TanhGrad max abs diff", diffs)
