"""The frozen weights on their way through the exporter: moved into the bundle's weights file once, never loaded by
the gradient builder or the training passes, referenced by both graphs at the same bytes; shape inference without
them."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lars_artifacts import CHECKPOINT, EVAL_MODEL, TRAINING_MODEL, WEIGHTS
from lars_artifacts.ort_checkpoint import read_checkpoint
from lars_export import training_graphs
from lars_export.preflight import weightless

RNG = np.random.default_rng(0)
FROZEN = {"w0": RNG.normal(size=(32, 32)).astype(np.float32), "w2": RNG.normal(size=(32, 10)).astype(np.float32)}
ADAPTER = {"lora_A": RNG.normal(size=(32, 4)).astype(np.float32) * 0.1,
           "lora_B": RNG.normal(size=(4, 32)).astype(np.float32) * 0.1}
SHAPE = np.array([-1, 32], np.int64)  # a small initializer a shape op reads: stays inline


def _forward():
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["x2"]),
             helper.make_node("MatMul", ["x2", "w0"], ["h0"]),
             helper.make_node("MatMul", ["x2", "lora_A"], ["a"]), helper.make_node("MatMul", ["a", "lora_B"], ["b"]),
             helper.make_node("Add", ["h0", "b"], ["h1"]), helper.make_node("Tanh", ["h1"], ["h2"]),
             helper.make_node("MatMul", ["h2", "w2"], ["logits"])]
    inits = {**FROZEN, **ADAPTER, "shape": SHAPE}
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def _external(model, location: str = WEIGHTS) -> dict[str, tuple[int, int]]:
    """name -> (offset, length) of the external initializers, read from the proto here (not with the code under
    test); all must lie in `location`."""
    out = {}
    for init in model.graph.initializer:
        if init.data_location == TensorProto.EXTERNAL:
            info = {e.key: e.value for e in init.external_data}
            assert info["location"] == location
            out[init.name] = (int(info["offset"]), int(info["length"]))
    return out


def test_weightless_copy_infers_what_the_whole_model_infers():
    model = _forward()
    light = weightless(model)
    assert {i.name for i in light.graph.initializer} == {"lora_A", "lora_B", "shape"}  # 512, 512, 16 bytes: inline
    assert {i.name for i in light.graph.input} == {"x", "w0", "w2"}
    assert len(model.graph.initializer) == 5 and model.graph.initializer[0].raw_data  # the original is untouched
    full = onnx.shape_inference.infer_shapes(model).graph.value_info
    inferred = onnx.shape_inference.infer_shapes(light).graph.value_info
    assert len(full) == len(inferred) == 6
    assert [str(v) for v in full] == [str(v) for v in inferred]  # names, types and shapes, "x2" via "shape" too


def test_generate_moves_the_frozen_weights_once_and_both_graphs_read_the_same_bytes(tmp_path):
    model = _forward()
    training_graphs.generate(model, sorted(ADAPTER), tmp_path)
    assert not (tmp_path / training_graphs.FORWARD_MODEL).exists()
    # moved out of the caller's proto, not copied
    assert all(not i.HasField("raw_data") for i in model.graph.initializer if i.name in FROZEN)
    data = (tmp_path / WEIGHTS).read_bytes()
    train = onnx.load(str(tmp_path / TRAINING_MODEL), load_external_data=False)
    evalm = onnx.load(str(tmp_path / EVAL_MODEL), load_external_data=False)
    where = _external(train)
    assert set(where) == set(FROZEN) and _external(evalm) == where
    for name, (offset, length) in where.items():
        assert offset % 64 == 0
        stored = np.frombuffer(data[offset:offset + length], np.float32).reshape(FROZEN[name].shape)
        np.testing.assert_array_equal(stored, FROZEN[name])
    assert len(data) == 32 * 32 * 4 + 32 * 10 * 4  # just the two (the first one's end is aligned)
    # the adapters are the checkpoint's trainable parameters, with their values
    ckpt = read_checkpoint(tmp_path / CHECKPOINT)
    assert sorted(n for n, grad in ckpt.requires_grad.items() if grad) == sorted(ADAPTER)
    for name, value in ADAPTER.items():
        np.testing.assert_array_equal(ckpt.parameters[name], value)

    # a training pass adds a large initializer inline; share_weights appends it and leaves the rest where it is
    basis = RNG.normal(size=(32, 16)).astype(np.float32)

    def add_basis(m):
        m.graph.initializer.append(numpy_helper.from_array(basis, "lars_basis"))
        m.graph.node.append(helper.make_node("Identity", ["lars_basis"], ["unused"]))
        return [SimpleNamespace(changed=1)]

    training_graphs.rewrite_training_model(tmp_path, add_basis)
    size = training_graphs.share_weights(tmp_path)
    assert size == (tmp_path / WEIGHTS).stat().st_size == len(data) + (-len(data) % 64) + basis.nbytes
    train = onnx.load(str(tmp_path / TRAINING_MODEL), load_external_data=False)
    assert {n: w for n, w in _external(train).items() if n != "lars_basis"} == where
    assert _external(onnx.load(str(tmp_path / EVAL_MODEL), load_external_data=False)) == where
    loaded = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / TRAINING_MODEL)).graph.initializer}
    np.testing.assert_array_equal(loaded["lars_basis"], basis)
    np.testing.assert_array_equal(loaded["w0"], FROZEN["w0"])


def test_generate_copies_weights_stored_in_another_file(tmp_path):
    """The exporter's graph keeps its frozen weights in the ONNX export's own file; generate copies them over."""
    from lars_export.external_data import ExternalDataWriter

    model = _forward()
    (tmp_path / "export").mkdir()
    with ExternalDataWriter(tmp_path / "export" / "model.onnx_data") as writer:
        writer.add(onnx.TensorProto(), b"\1" * 100)  # something before, so the offsets differ
        for init in model.graph.initializer:
            if init.name in FROZEN:
                writer.move_inline(init)
    (tmp_path / "bundle").mkdir()
    training_graphs.generate(model, sorted(ADAPTER), tmp_path / "bundle", weights_dir=tmp_path / "export")
    loaded = {i.name: numpy_helper.to_array(i)
              for i in onnx.load(str(tmp_path / "bundle" / TRAINING_MODEL)).graph.initializer}
    for name, value in FROZEN.items():
        np.testing.assert_array_equal(loaded[name], value)
    assert set(_external(onnx.load(str(tmp_path / "bundle" / EVAL_MODEL), load_external_data=False))) == set(FROZEN)


def test_onnx_export_writes_every_parameter_once_frozen_ones_external(tiny_models, tmp_path):
    """export_onnx traces without parameters and writes each from its torch tensor: every adapter tensor is a
    separate inline initializer (counted: the TorchScript exporter merges equal parameters, which is why add_lora
    gives each lora_B distinct values until zero_lora_b), the frozen weights are in the external file with the
    model's values."""
    import torch
    from transformers import AutoModelForCausalLM

    from lars_export import adapters, onnx_export
    from lars_export.config import ExportConfig

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32)
    peft_model, _ = adapters.add_lora(model, ExportConfig(model=str(tiny_models["llama"]), out=str(tmp_path / "x"),
                                                          lora_rank=4))
    expected = {p.onnx_name for p in adapters.adapter_params(peft_model)}
    onnx_export.export_onnx(peft_model, tmp_path / "model.onnx", 17, model.config.vocab_size)
    graph = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    assert {i.name for i in graph.graph.input} == {"input_ids", "attention_mask"}
    inits = {i.name: i for i in graph.graph.initializer}
    inline = {n for n, i in inits.items() if i.data_location != TensorProto.EXTERNAL}
    assert inline == expected and len(expected) == 2 * 7 * 2  # A and B of 7 projections in 2 layers
    values = dict(onnx_export._wrapper(peft_model).named_parameters())
    assert set(inits) == set(values)
    data = (tmp_path / onnx_export.WEIGHTS_FILE).read_bytes()
    external = _external(graph, onnx_export.WEIGHTS_FILE)
    assert set(external) == set(inits) - inline
    for name, init in inits.items():
        want = values[name].detach().numpy()
        if name in inline:
            np.testing.assert_array_equal(numpy_helper.to_array(init), want)
        else:
            offset, length = external[name]
            assert offset % 64 == 0 and length == want.nbytes
            np.testing.assert_array_equal(np.frombuffer(data[offset:offset + length], np.float32).reshape(want.shape),
                                          want)


def test_a_pass_writes_its_large_tensors_beside_the_weights_and_reads_them_back(tmp_path):
    import onnx_ir as ir

    from lars_export.passes import PassContext, _ir
    from lars_export.passes._base import PASS_WEIGHTS

    context = PassContext(trainable=set(), weights_dir=str(tmp_path))
    big, small = RNG.normal(size=(40, 30)).astype(np.float32), np.arange(6, dtype=np.int64)
    graph = ir.Graph([], [], nodes=[], name="g")
    first = _ir.new_initializer(graph, "big", [big[:25], big[25:]], big.dtype, big.shape, context)  # in pieces
    second = _ir.new_initializer(graph, "big_t", [np.ascontiguousarray(big.T)], big.dtype, big.T.shape, context)
    inline = _ir.new_initializer(graph, "small", [small], small.dtype, small.shape, context)
    assert isinstance(first.const_value, ir.ExternalTensor) and first.const_value.location == PASS_WEIGHTS
    assert first.const_value.offset % 64 == 0 and second.const_value.offset % 64 == 0
    assert not isinstance(inline.const_value, ir.ExternalTensor)
    np.testing.assert_array_equal(_ir.read_rows(first.const_value, 0, 40), big)
    np.testing.assert_array_equal(_ir.read_rows(second.const_value, 3, 7), big.T[3:7])
    # as the bundle's graph stores them: onnx's own reader finds the same values in the file
    proto = ir.serde.serialize_model(ir.Model(graph, ir_version=10))
    assert [i.name for i in proto.graph.initializer] == ["big", "big_t", "small"]
    for init, want in zip(proto.graph.initializer, (big, big.T, small)):
        np.testing.assert_array_equal(numpy_helper.to_array(init, base_dir=str(tmp_path)), want)
    no_dir = _ir.new_initializer(ir.Graph([], [], nodes=[]), "big", [big], big.dtype, big.shape,
                                 PassContext(trainable=set()))
    assert not isinstance(no_dir.const_value, ir.ExternalTensor)
    np.testing.assert_array_equal(no_dir.const_value.numpy(), big)
