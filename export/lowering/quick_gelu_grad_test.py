"""QuickGeluGrad lowered equals the training build's kernel: alpha 1 (SiLU, what our graphs hold), the default
1.702 (no attribute) and another value; odd shapes, large |x| (sigmoid saturation)."""

import numpy as np

from ._testing import check, make_model, ms

ALPHAS = {"silu": 1.0, "default": None, "other": 0.37}


def test_quick_gelu_grad_matches_training_kernel(tmp_path):
    rng = np.random.default_rng(1)
    feeds, nodes, outputs = {}, [], []
    for name, alpha in ALPHAS.items():
        x = rng.normal(size=(3, 5, 7)).astype(np.float32) * 4
        x.flat[:4] = [-30.0, 30.0, 0.0, -0.0]
        feeds[f"x_{name}"], feeds[f"dy_{name}"] = x, rng.normal(size=x.shape).astype(np.float32)
        attrs = {} if alpha is None else {"alpha": alpha}
        nodes.append(ms("QuickGeluGrad", [f"dy_{name}", f"x_{name}"], [f"dx_{name}"], **attrs))
        outputs.append(f"dx_{name}")
    diffs = check(make_model(nodes, feeds, outputs), feeds, tmp_path, "QuickGeluGrad", strict_too=False)
    print("QuickGeluGrad max abs diff", diffs)
