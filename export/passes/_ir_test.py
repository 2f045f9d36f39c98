import numpy as np
import onnx

from lars_export.passes import _ir
from lars_export.passes._testing import export_lm, two_block_lm


def _parts(model) -> dict:
    return {part: [x.SerializeToString() for x in getattr(model.graph, part)]
            for part in ("node", "initializer", "input", "output")}


def test_the_round_trip_through_onnx_ir_keeps_the_graph_byte_identical(tmp_path):
    """Converting a pass's graph to onnx_ir and back (what run_passes does around IR passes) changes nothing ORT
    reads: nodes, initializers (an external one stays a reference to its file), inputs and outputs serialize to the
    same bytes, and value_info keeps exactly the entries it had."""
    from lars_export.external_data import ExternalDataWriter

    model = export_lm(two_block_lm(np.random.default_rng(0), 8, 16, 2, 11, 11), tmp_path / "lm.onnx")
    model.graph.value_info.extend(onnx.shape_inference.infer_shapes(model).graph.value_info)
    # what ORT's training graphs carry: value_info of values its optimiser removed, an empty doc_string written
    model.graph.value_info.append(onnx.helper.make_tensor_value_info("gone", onnx.TensorProto.FLOAT, [3]))
    model.graph.value_info.append(onnx.helper.make_tensor_value_info(model.graph.initializer[1].name,
                                                                     onnx.TensorProto.FLOAT, None))
    model.graph.doc_string = ""
    with ExternalDataWriter(tmp_path / "w.onnx_data") as writer:
        writer.move_inline(model.graph.initializer[0])
    before = onnx.ModelProto()
    before.CopyFrom(model)

    ir_model = _ir.to_ir(model, str(tmp_path))
    assert ir_model.graph.initializers[model.graph.initializer[0].name].const_value.base_dir == str(tmp_path)
    _ir.into_proto(ir_model, model)

    assert _parts(model) == _parts(before)
    assert model.SerializeToString() == before.SerializeToString()  # opsets, value_info order, everything
    assert len(before.graph.value_info) > 10
    assert sorted(v.SerializeToString() for v in model.graph.value_info) == \
        sorted(v.SerializeToString() for v in before.graph.value_info)
