"""FusedMatMul, expanded with strict=True (Transpose + MatMul, · alpha), equals the training build's kernel: every
transA/transB combination, alpha, 2-D to 4-D with batch broadcasting, ranks only inferred (no value_info); without
strict it is kept. transBatch raises."""

import numpy as np
import pytest
from onnx import helper

from lars_artifacts import LarsError

from ._testing import compare, lowered, make_model, ms, run_plain, run_reference

# name -> (A shape as stored, B shape as stored, transA, transB, alpha)
CASES = {"nt": ((5, 3), (4, 3), 0, 1, 1.0), "tn": ((3, 5), (3, 4), 1, 0, 1.0), "tt": ((2, 3, 5), (2, 4, 3), 1, 1, 0.5),
         "nn": ((2, 6, 5, 3), (3, 4), 0, 0, 2.0), "bcast": ((2, 1, 5, 3), (3, 4, 3), 0, 1, 1.0)}


def _model():
    rng = np.random.default_rng(10)
    feeds, nodes, outputs = {}, [], []
    for name, (a, b, ta, tb, alpha) in CASES.items():
        feeds[f"a_{name}"] = rng.normal(size=a).astype(np.float32)
        feeds[f"b_{name}"] = rng.normal(size=b).astype(np.float32)
        # a Relu between input and FusedMatMul: A's rank is inferred, not declared
        nodes += [helper.make_node("Relu", [f"a_{name}"], [f"ai_{name}"]),
                  ms("FusedMatMul", [f"ai_{name}", f"b_{name}"], [f"y_{name}"], transA=ta, transB=tb, alpha=alpha)]
        outputs.append(f"y_{name}")
    return make_model(nodes, feeds, outputs), feeds


def test_kept_without_strict():
    low, counts = lowered(_model()[0], strict=False)
    assert counts == {} and sum(n.op_type == "FusedMatMul" for n in low.graph.node) == len(CASES)


def test_strict_matches_kernel(tmp_path):
    model, feeds = _model()
    want = run_reference(model, feeds, tmp_path)
    low, counts = lowered(model, strict=True)
    assert counts == {"FusedMatMul": len(CASES)}
    print("FusedMatMul (strict) max abs diff", compare(run_plain(low, feeds), want))


def test_trans_batch_raises():
    feeds = {"a": np.zeros((2, 3, 4), np.float32), "b": np.zeros((2, 4, 5), np.float32)}
    model = make_model([ms("FusedMatMul", ["a", "b"], ["y"], transBatchA=1)], feeds, ["y"])
    with pytest.raises(LarsError, match="transBatchA"):
        lowered(model, strict=True)
