"""The preflight names each op ORT 1.19.2 cannot differentiate and the module it comes from."""

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from lars_artifacts import LarsError
from lars_export.preflight import check_gradient_ops, module_of


def _graph():
    w = numpy_helper.from_array(np.ones((4, 4), np.float32) * 0.1, "lora_A")
    nodes = [
        helper.make_node("MatMul", ["x", "lora_A"], ["h"], name="/model/base_model/model/model/layers.0/mlp/MatMul"),
        helper.make_node("CumSum", ["h", "axis"], ["c"], name="/model/base_model/model/model/layers.0/mlp/CumSum"),
        helper.make_node("ReduceMax", ["c"], ["r"], name="/model/base_model/model/model/layers.1/attn/ReduceMax",
                         axes=[1], keepdims=1),
        helper.make_node("Add", ["c", "r"], ["logits"], name="/model/base_model/model/lm_head/Add"),
        # CumSum on integer positions: not on a differentiable path, must not be reported.
        helper.make_node("CumSum", ["pos", "axis"], ["pos_c"], name="/model/base_model/model/model/rotary/CumSum"),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4]),
         helper.make_tensor_value_info("pos", onnx.TensorProto.INT64, [2, 4])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [2, 4]),
         helper.make_tensor_value_info("pos_c", onnx.TensorProto.INT64, [2, 4])],
        [w, numpy_helper.from_array(np.array(1, np.int64), "axis")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_reports_every_unsupported_op_with_its_module():
    with pytest.raises(LarsError) as e:
        check_gradient_ops(_graph(), {"lora_A"}, "logits")
    msg = str(e.value)
    assert "CumSum (in model.layers.0.mlp)" in msg
    assert "ReduceMax (in model.layers.1.attn)" in msg
    assert "rotary" not in msg
    assert "\n" not in msg


def test_ort_itself_rejects_what_preflight_reports(tmp_path):
    """Cross-check the op list against the installed onnxruntime-training: it really has no CumSum gradient."""
    from lars_artifacts import LarsError
    from lars_export import training_graphs

    model = _graph()
    model.graph.output.pop()  # keep only the float output for the loss
    model.graph.node.pop()
    with pytest.raises(LarsError, match="onnxruntime-training could not build the training graph.*(CumSum|ReduceMax)"):
        training_graphs.generate(model, ["lora_A"], tmp_path)  # ORT's training build, in its child process


def test_module_names_read_like_hf_paths():
    assert module_of("/model/base_model/model/model/layers.3/self_attn/Einsum") == "model.layers.3.self_attn"
    assert module_of("/model/lm_head/MatMul") == "lm_head"
