"""QuickGelu, expanded with strict=True, equals the training build's kernel (and is kept without strict)."""

import numpy as np

from ._testing import compare, lowered, make_model, ms, run_plain, run_reference

ALPHAS = {"silu": 1.0, "default": None, "other": 0.37}


def _model_and_feeds():
    rng = np.random.default_rng(2)
    feeds, nodes, outputs = {}, [], []
    for name, alpha in ALPHAS.items():
        x = rng.normal(size=(4, 3, 9)).astype(np.float32) * 4
        x.flat[:3] = [-30.0, 30.0, 0.0]
        feeds[f"x_{name}"] = x
        nodes.append(ms("QuickGelu", [f"x_{name}"], [f"y_{name}"], **({} if alpha is None else {"alpha": alpha})))
        outputs.append(f"y_{name}")
    return make_model(nodes, feeds, outputs), feeds


def test_quick_gelu_kept_without_strict():
    model, _ = _model_and_feeds()
    low, counts = lowered(model, strict=False)
    assert counts == {} and [n.op_type for n in low.graph.node] == ["QuickGelu"] * len(ALPHAS)


def test_quick_gelu_strict_matches_kernel(tmp_path):
    model, feeds = _model_and_feeds()
    want = run_reference(model, feeds, tmp_path)
    low, counts = lowered(model, strict=True)
    assert counts == {"QuickGelu": len(ALPHAS)}
    print("QuickGelu (strict) max abs diff", compare(run_plain(low, feeds), want))

