import numpy as np
import onnx
from onnx import helper, numpy_helper

from lars_export.passes import PassContext
from lars_export.passes.pretranspose_frozen import PRETRANSPOSE_FROZEN


def _graph():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(6, 4)).astype(np.float32)   # frozen, [out, in] like nn.Linear
    a = rng.normal(size=(3, 4)).astype(np.float32)   # trainable adapter: its transpose must stay
    emb = rng.normal(size=(10, 4)).astype(np.float32)  # tied: read by Gather and transposed for the head
    nodes = [
        helper.make_node("Transpose", ["w"], ["wT"], name="/m/Transpose", perm=[1, 0]),
        helper.make_node("MatMul", ["x", "wT"], ["y"], name="/m/MatMul"),
        helper.make_node("Transpose", ["a"], ["aT"], name="/m/lora/Transpose"),
        helper.make_node("MatMul", ["x", "aT"], ["z"], name="/m/lora/MatMul"),
        helper.make_node("Transpose", ["emb"], ["embT"], name="/head/Transpose"),
        helper.make_node("MatMul", ["x", "embT"], ["logits"], name="/head/MatMul"),
        helper.make_node("Gather", ["emb", "ids"], ["e"], name="/emb/Gather"),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4]),
         helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [2])],
        [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [2, None]) for n in ("y", "z", "logits", "e")],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(a, "a"), numpy_helper.from_array(emb, "emb")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model, feeds):
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(model).run(None, feeds)


def test_folds_frozen_transposes_keeps_trainable_and_stores_a_tied_table_once():
    model = _graph()
    feeds = {"x": np.random.default_rng(1).normal(size=(2, 4)).astype(np.float32), "ids": np.array([1, 7])}
    before = _run(model, feeds)
    report = PRETRANSPOSE_FROZEN.run(model, PassContext(trainable={"a"}))
    after = _run(model, feeds)

    for b, a in zip(before, after):
        np.testing.assert_array_equal(b, a)
    assert report.changed == 2 and report.skipped == []
    transposes = [n.name for n in model.graph.node if n.op_type == "Transpose"]
    assert transposes == ["/m/lora/Transpose", "/emb/Gather/Rows"]  # the lookup's [hidden, ids] columns, as rows
    (lookup,) = [n for n in model.graph.node if n.op_type == "Gather"]
    assert list(lookup.input) == ["embT", "ids"] and lookup.attribute[0].i == 1
    names = {i.name for i in model.graph.initializer}
    assert names == {"a", "wT", "embT"}  # w and the tied emb dropped: the head and the lookup read embT
    assert report.details == {"tied_lookups": 1, "dropped_initializers": 2}
    onnx.checker.check_model(model)


def test_reads_weights_stored_as_external_data(tmp_path):
    """The exporter's graph holds its frozen weights as external data (read through PassContext.weights_dir): the
    result is the one of the inline graph."""
    import copy

    from lars_export.external_data import ExternalDataWriter

    inline = _graph()
    external = copy.deepcopy(inline)
    with ExternalDataWriter(tmp_path / "w.onnx_data") as writer:
        for init in external.graph.initializer:
            if init.name not in {"a"}:
                writer.move_inline(init)
    PRETRANSPOSE_FROZEN.run(inline, PassContext(trainable={"a"}))
    report = PRETRANSPOSE_FROZEN.run(external, PassContext(trainable={"a"}, weights_dir=str(tmp_path)))
    assert report.changed > 0
    want = {i.name: numpy_helper.to_array(i) for i in inline.graph.initializer}
    got = {i.name: numpy_helper.to_array(i, base_dir=str(tmp_path)) for i in external.graph.initializer}
    assert set(got) == set(want)
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value)


def test_transposes_block_by_block_reading_the_file_in_chunks(tmp_path):
    """A large weight's transpose is made a block of its rows at a time from chunks of W's rows (so neither is ever
    whole in memory): with blocks and chunks that do not divide the shape, the blocks stack to exactly Wᵀ."""
    import onnx_ir as ir

    from lars_export.passes.pretranspose_frozen import transposed_blocks

    w = np.random.default_rng(2).normal(size=(7, 5)).astype(np.float32)
    (tmp_path / "w.bin").write_bytes(b"\0" * 64 + w.tobytes())  # at an offset, as in a shared weights file
    tensor = ir.ExternalTensor("w.bin", 64, w.nbytes, ir.DataType.FLOAT, shape=ir.Shape(w.shape), name="w",
                               base_dir=str(tmp_path))
    blocks = list(transposed_blocks(tensor, block_bytes=2 * 7 * 4, read_bytes=3 * 5 * 4))  # 2 rows of Wᵀ, 3 of W
    assert [b.shape for b in blocks] == [(2, 7), (2, 7), (1, 7)]
    np.testing.assert_array_equal(np.concatenate(blocks), w.T)
