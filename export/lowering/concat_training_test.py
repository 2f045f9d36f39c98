"""ConcatTraining lowered equals the training build's kernel: axes 0, 1 and -1, one to three inputs, float and
int64 (the shape vectors of our graphs), the lengths output read or not; at opset 17 (Shape start/end) and 13."""

import numpy as np
from onnx import TensorProto

from ._testing import compare, lowered, make_model, ms, run_plain, run_reference

INT64 = TensorProto.INT64


def _model(opset: int):
    rng = np.random.default_rng(3)
    feeds = {"a": rng.normal(size=(2, 3, 5)).astype(np.float32), "b": rng.normal(size=(2, 4, 5)).astype(np.float32),
             "c": rng.normal(size=(2, 1, 5)).astype(np.float32),
             "s0": np.array([2], np.int64), "s1": np.array([3, 4], np.int64), "s2": np.array([-1], np.int64),
             "u": rng.normal(size=(3, 2)).astype(np.float32), "v": rng.normal(size=(3, 7)).astype(np.float32)}
    nodes = [ms("ConcatTraining", ["a", "b", "c"], ["abc", "abc_len"], axis=1),          # lengths read
             ms("ConcatTraining", ["s0", "s1", "s2"], ["shape", "shape_len"], axis=0),   # lengths unread
             ms("ConcatTraining", ["u", "v"], ["uv", "uv_len"], axis=-1),
             ms("ConcatTraining", ["a"], ["a1", "a1_len"], axis=-2),
             ms("ConcatTraining", ["b"], ["b1"], axis=0)]                                # no lengths output
    outputs = ["abc", ("abc_len", INT64), ("shape", INT64), "uv", ("uv_len", INT64), "a1", ("a1_len", INT64), "b1"]
    return make_model(nodes, feeds, outputs, opset=opset), feeds


def test_concat_training_matches_kernel(tmp_path):
    model, feeds = _model(17)
    want = run_reference(model, feeds, tmp_path)  # the kernel does not depend on the opset: one reference
    for opset in (17, 13):
        low, counts = lowered(_model(opset)[0])
        assert counts == {"ConcatTraining": 5}
        print(f"ConcatTraining (opset {opset}) max abs diff", compare(run_plain(low, feeds), want))


def test_unread_lengths_are_not_computed():
    model, _ = _model(17)
    low, _ = lowered(model)
    assert "shape_len" not in {o for n in low.graph.node for o in n.output}
    assert "abc_len" in {o for n in low.graph.node for o in n.output}
