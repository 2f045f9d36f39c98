"""InPlaceAccumulatorV2 dropped by lower_training_step: each `<param>_grad` is a graph output equal to what the
training build's accumulator writes into its (reset) buffer; buffers and lazy_reset_grad are gone, inputs and
outputs in the promised order (user inputs, then `trainable`'s order; loss, other outputs, then gradients)."""

import numpy as np
import pytest
from onnx import TensorProto, helper

from lars_artifacts import LarsError

from . import lower_training_step
from ._testing import make_model, ms, run_plain, run_reference

P, Q = "layer.lora_A.weight", "layer.lora_B.weight"


def _training_like():
    """A graph laid out like ORT's training graph: inputs x, params, accumulation buffers, lazy_reset_grad; P's
    gradient named <P>_grad, Q's not (an Identity must name it)."""
    rng = np.random.default_rng(11)
    feeds = {"x": rng.normal(size=(3, 4)).astype(np.float32), P: rng.normal(size=(4, 2)).astype(np.float32),
             Q: rng.normal(size=(2, 5)).astype(np.float32),
             f"{P}_grad.accumulation.buffer": np.full((4, 2), 7.0, np.float32),
             f"{Q}_grad.accumulation.buffer": np.full((2, 5), 7.0, np.float32),
             "lazy_reset_grad": np.array([True])}
    nodes = [helper.make_node("MatMul", ["x", P], ["h"]), helper.make_node("MatMul", ["h", Q], ["logits"]),
             helper.make_node("ReduceSum", ["logits"], ["loss"], keepdims=0),
             # d loss / dP = xᵀ·(1·Qᵀ), d loss / dQ = hᵀ·1
             helper.make_node("Transpose", ["x"], ["xt"]), helper.make_node("Transpose", [Q], ["qt"]),
             helper.make_node("MatMul", ["ones", "qt"], ["dh"]),
             helper.make_node("MatMul", ["xt", "dh"], [f"{P}_grad"]),
             helper.make_node("Transpose", ["h"], ["ht"]), helper.make_node("MatMul", ["ht", "ones"], ["q_gradient"])]
    for param, grad in ((P, f"{P}_grad"), (Q, "q_gradient")):
        nodes.append(ms("InPlaceAccumulatorV2", [f"{param}_grad.accumulation.buffer", grad, "lazy_reset_grad"],
                        [f"{param}_grad.accumulation.out", f"{param}_grad.accumulation.sum"]))
    outputs = ["loss", "logits"] + [(f"{p}_grad.accumulation.out", TensorProto.BOOL) for p in (P, Q)]
    outputs += [f"{p}_grad.accumulation.sum" for p in (P, Q)]
    inits = {"ones": np.ones((3, 5), np.float32)}
    return make_model(nodes, feeds, outputs, inits), feeds


def test_gradients_become_outputs(tmp_path):
    model, feeds = _training_like()
    want = run_reference(model, feeds, tmp_path)  # lazy_reset_grad: the buffers are overwritten by the gradients
    report = lower_training_step(model, [Q, P])
    assert report.lowered == {"InPlaceAccumulatorV2": 2} and report.dropped_inputs == 3
    assert [i.name for i in model.graph.input] == ["x", Q, P]
    assert [o.name for o in model.graph.output] == ["loss", "logits", f"{Q}_grad", f"{P}_grad"]
    assert [list(d.dim_value for d in o.type.tensor_type.shape.dim) for o in model.graph.output[2:]] == [[2, 5],
                                                                                                          [4, 2]]
    assert {o.domain for o in model.opset_import} == {""}
    got = run_plain(model, {k: feeds[k] for k in ("x", P, Q)})
    for p in (P, Q):
        np.testing.assert_array_equal(got[f"{p}_grad"], want[f"{p}_grad.accumulation.sum"])
    np.testing.assert_array_equal(got["loss"], want["loss"])
    assert report.to_dict()["gradients"] == 2


def test_errors_name_the_problem_and_change_nothing():
    model, _ = _training_like()
    before = model.SerializeToString()
    with pytest.raises(LarsError, match="not in `trainable`"):
        lower_training_step(model, [P])
    with pytest.raises(LarsError, match="no input 'nope'"):
        lower_training_step(model, [P, Q, "nope"])
    assert model.SerializeToString() == before
    model.graph.node.append(helper.make_node("Not", [f"{P}_grad.accumulation.out"], ["flag"], name="reader"))
    with pytest.raises(LarsError, match=r"InPlaceAccumulatorV2.*read by another node"):
        lower_training_step(model, [P, Q])
