"""What the rule tests share: a small model around the op, run as it is by the training build's kernels (the
reference) and lowered by plain onnxruntime in this process, every output compared."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

MS = "com.microsoft"
# The training build's ops plain onnxruntime lacks: none may remain after lowering.
TRAINING_OPS = {"ConcatTraining", "SplitTraining", "SliceGrad", "SoftmaxGrad_13", "SoftmaxCrossEntropyLossGrad",
                "SimplifiedLayerNormalizationGrad", "QuickGeluGrad", "InPlaceAccumulatorV2"}
RTOL = 1e-6
# Elements that are differences of larger terms (dY − Σ dY·Y, p − 1) carry the terms' rounding: the absolute
# tolerance is this fraction of the output's largest magnitude.
ATOL_OF_MAX = 1e-6


def make_model(nodes, feeds: dict, outputs: list, initializers: dict | None = None, opset: int = 17):
    """A model whose inputs are typed like `feeds`' arrays, whose outputs are `outputs` (names, float32, or
    (name, onnx elem type) pairs) and whose initializers are `initializers` (name -> array)."""
    from onnx import TensorProto, helper, numpy_helper

    inputs = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(a.dtype), list(a.shape))
              for name, a in feeds.items()]
    outs = [helper.make_tensor_value_info(*(o if isinstance(o, tuple) else (o, TensorProto.FLOAT)), None)
            for o in outputs]
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in (initializers or {}).items()]
    graph = helper.make_graph(nodes, "lowering_test", inputs, outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)])
    model.ir_version = 8  # what ORT 1.19.2 reads
    return model


def ms(op_type: str, inputs, outputs, **attrs):
    from onnx import helper

    return helper.make_node(op_type, inputs, outputs, domain=MS, name=f"{op_type}:{outputs[0]}", **attrs)


def run_reference(model, feeds: dict, where: Path) -> dict:
    """Every output of `model` as the training build's InferenceSession computes it (child process)."""
    import onnx

    from lars_export import ort_training

    where.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(where / "reference.onnx"))
    np.savez(where / "feeds.npz", **feeds)
    ort_training.call("run_model", where / "reference.onnx", where / "feeds.npz", where / "reference.npz")
    return dict(np.load(where / "reference.npz"))


def run_plain(model, feeds: dict) -> dict:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def lowered(model, strict: bool = False):
    """A lowered copy of `model` and the op counts lowered; asserts what may remain does."""
    from . import lower_ops
    from .lower import runs_on_plain_ort

    out = copy.deepcopy(model)
    counts = lower_ops(out, strict=strict)
    for node in out.graph.node:
        assert node.op_type not in TRAINING_OPS, f"{node.op_type} left in the lowered graph"
        assert runs_on_plain_ort(node, strict), f"{node.domain}:{node.op_type} left in the lowered graph"
    if strict:
        assert all((n.domain or "") == "" for n in out.graph.node)
        assert {o.domain for o in out.opset_import} <= {""}
    return out, counts


def compare(got: dict, want: dict, rtol: float = RTOL, atol_of_max: float = ATOL_OF_MAX) -> float:
    """Asserts every output of `want` matches in `got` (|got − want| <= rtol·|want| + atol_of_max·max|want|,
    NaN-free); returns the largest absolute difference."""
    worst = 0.0
    for name, ref in want.items():
        value = got[name]
        assert value.shape == ref.shape and value.dtype == ref.dtype, (name, value.shape, ref.shape)
        if ref.dtype.kind in "iub":
            np.testing.assert_array_equal(value, ref, err_msg=name)
            continue
        assert np.isfinite(value).all(), name
        atol = atol_of_max * float(np.abs(ref).max()) if ref.size else 0.0
        np.testing.assert_allclose(value, ref, rtol=rtol, atol=atol, err_msg=name)
        if value.size:
            worst = max(worst, float(np.abs(value.astype(np.float64) - ref).max()))
    return worst


def check(model, feeds: dict, where: Path, op_type: str, strict_too: bool = True, rtol: float = RTOL,
          atol_of_max: float = ATOL_OF_MAX) -> dict:
    """Reference once; the lowered model (and the strict one) on plain onnxruntime against it. Returns the largest
    absolute differences, per mode."""
    want = run_reference(model, feeds, where)
    diffs = {}
    for strict in (False, True) if strict_too else (False,):
        low, counts = lowered(model, strict)
        assert counts.get(op_type, 0) >= 1, counts
        diffs["strict" if strict else "plain"] = compare(run_plain(low, feeds), want, rtol, atol_of_max)
    return diffs
