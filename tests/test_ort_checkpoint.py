"""lars_artifacts.ort_checkpoint against onnxruntime-training 1.19.2 itself.

ORT's training build runs in child processes (lars_export.ort_training): `dump_checkpoint` there reports what ORT's
own loader sees in a file (and what ORT saves back after loading it), `train_steps` runs ORT's Module + AdamW
Optimizer. The training artifacts are ORT's own, generated from a tiny hand-built graph (three trainable tensors,
one frozen weight), so this file does not depend on the LoRA exporter. Importing the training build takes seconds,
so the `ort` fixture runs all of ORT's work in two children (`batch`) and the tests check the results.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from lars_artifacts import BundleError
from lars_artifacts.ort_checkpoint import (LEARNING_RATE_PROPERTY, OptimizerState, OrtCheckpoint, read_checkpoint,
                                           write_checkpoint)

LR = 1e-2
TRAINABLE = ["b1", "w1", "w2"]


def _tiny_forward():
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = {"w0": rng.normal(size=(8, 8)), "w1": rng.normal(size=(8, 16)) * 0.3, "b1": rng.normal(size=16) * 0.1,
             "w2": rng.normal(size=(16, 5)) * 0.3}
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h0"]), helper.make_node("MatMul", ["h0", "w1"], ["h1"]),
             helper.make_node("Add", ["h1", "b1"], ["h2"]), helper.make_node("Tanh", ["h2"], ["h3"]),
             helper.make_node("MatMul", ["h3", "w2"], ["logits"])]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 5])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def _adamw(optimizer_model: Path):
    import onnx
    from onnx import helper

    (node,) = [n for n in onnx.load(str(optimizer_model)).graph.node if n.op_type == "AdamWOptimizer"]
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _adamw_reference(attrs, param, grad, m, v, step, lr):
    """One step of ORT's AdamWOptimizer (adam_mode 1, the Hugging Face form) in float64: new (param, m, v)."""
    assert attrs["adam_mode"] == 1 and attrs["correct_bias"] == 1
    a, b, eps, wd = attrs["alpha"], attrs["beta"], attrs["epsilon"], attrs["weight_decay"]
    param, grad, m, v = (np.asarray(t, np.float64) for t in (param, grad, m, v))
    m = a * m + (1 - a) * grad
    v = b * v + (1 - b) * grad * grad
    step_size = lr * np.sqrt(1 - b ** step) / (1 - a ** step)
    new = param - step_size * m / (np.sqrt(v) + eps)
    return new - lr * wd * new, m, v


def _scratch(ck3: OrtCheckpoint) -> OrtCheckpoint:
    """A checkpoint built field by field: ck3's parameters, moments of our own, step 7, learning rates and
    properties of our own."""
    return OrtCheckpoint(
        parameters={n: np.array(ck3.parameters[n], copy=True) for n in reversed(TRAINABLE)},  # any order
        requires_grad={n: True for n in TRAINABLE},
        optimizer=OptimizerState(step=7, learning_rate=0.02, initial_learning_rate=0.0025,
                                 first_moments={n: ck3.optimizer.first_moments[n] * np.float32(2) for n in TRAINABLE},
                                 second_moments={n: ck3.optimizer.second_moments[n] * np.float32(3)
                                                 for n in TRAINABLE}),
        properties={"epoch": 4, "best_loss": 1.25, "run": "r-1", "negative": -(2**40)})


def _dtypes() -> OrtCheckpoint:
    """Every dtype ORT 1.19.2 loads, frozen and trainable parameters, no optimizer, properties of each type."""
    rng = np.random.default_rng(2)
    params = {
        "f32": rng.normal(size=(3, 4)).astype(np.float32),
        "f64": rng.normal(size=(2, 2)).astype(np.float64),
        "i64": np.array([[-(2**40), 7]], np.int64),
        "i32": np.arange(-3, 3, dtype=np.int32),
        "i8": np.array([-128, 0, 127], np.int8),
        "u8": np.arange(250, 256, dtype=np.uint8).reshape(2, 3),
        "u16": np.array([65535, 1], np.uint16),
        "bool": np.array([True, False, True]),
        "one": np.array([1.5], np.float32),  # (a rank-0 tensor, ORT 1.19.2's loader turns into shape [1])
        "empty": np.zeros((2, 0), np.float32),
        "big-endian": np.arange(6, dtype=">f4").reshape(3, 2),
        "ünïcödé name": np.ones((1, 1, 2), np.float32),
    }
    return OrtCheckpoint(parameters=params, requires_grad={n: n in ("f32", "one") for n in params}, optimizer=None,
                         properties={"s": "ünï", "f": -0.5, "i": 3})


@pytest.fixture(scope="module")
def ort(tmp_path_factory):
    """ORT's artifacts for the tiny graph and a batch; ORT's own checkpoint after 3 AdamW steps (`ck3`); then our
    files (ck3 rewritten, one built from scratch, one of every dtype) and everything ORT makes of them."""
    import onnx

    from lars_export.ort_training import call

    root = tmp_path_factory.mktemp("ort_checkpoint")
    art, f = root / "artifacts", (lambda name: str(root / name))
    art.mkdir()
    onnx.save(_tiny_forward(), f("forward.onnx"))
    rng = np.random.default_rng(1)
    feeds = f("feeds.npz")
    np.savez(feeds, x=rng.normal(size=(6, 8)).astype(np.float32), labels=rng.integers(0, 5, 6).astype(np.int64))
    call("batch", [["generate", [f("forward.onnx"), TRAINABLE, str(art)]],
                   ["train_steps", [str(art), None, feeds, 3, LR, f("first.npz"), f("ck3")]]])

    ck3 = read_checkpoint(root / "ck3")
    write_checkpoint(root / "ours3", ck3)
    scratch, dtypes = _scratch(ck3), _dtypes()
    write_checkpoint(root / "scratch", scratch)
    write_checkpoint(root / "dtypes", dtypes)

    def dump(tag, path=None, directory=False):  # what ORT sees in root/tag: tag.dump.npz; resaved as tag.resaved
        return ["dump_checkpoint", [str(path or f(tag)), f(tag + ".dump.npz")] + ([str(art), f(tag + ".resaved")]
                                                                                  if directory else [])]

    def train(checkpoint, steps, out, save_to=None):
        return ["train_steps", [str(art), checkpoint, feeds, steps, LR, f(out + ".npz"), save_to and f(save_to)]]

    jobs = {"initial": dump("initial", art / "checkpoint"), "ck3": dump("ck3"),
            "ours3": dump("ours3", directory=True), "scratch": dump("scratch", directory=True),
            "dtypes": dump("dtypes"),
            "cont_theirs": train(f("ck3"), 2, "cont_theirs", "after_theirs"),
            "cont_ours": train(f("ours3"), 2, "cont_ours", "after_ours"),
            "scratch_step": train(f("scratch"), 1, "scratch_step", "scratch_after"),
            "ck3_step": train(f("ck3"), 1, "ck3_step")}
    results = dict(zip(jobs, call("batch", list(jobs.values()))))
    return SimpleNamespace(root=root, art=art, initial=art / "checkpoint", ck3=root / "ck3", results=results,
                           first=dict(np.load(f("first.npz"))), adamw=_adamw(art / "optimizer_model.onnx"),
                           scratch=scratch, dtypes=dtypes, npz=lambda name: dict(np.load(f(name))))


def _assert_same_tensors(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for name, value in want.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
        assert np.array_equal(got[name], value), name


# -- (1) what we read is what ORT's loader sees ---------------------------------------------------------------

def test_reader_sees_what_ort_sees_in_the_initial_and_a_trained_checkpoint(ort):
    for path, tag in ((ort.initial, "initial"), (ort.ck3, "ck3")):
        ours, dump = read_checkpoint(path), ort.results[tag]
        assert set(ours.parameters) == set(dump["names"]) == set(TRAINABLE)
        assert ours.requires_grad == dump["requires_grad"]
        _assert_same_tensors(ours.parameters, ort.npz(f"{tag}.dump.npz"))
        assert ours.properties == dump["properties"] == {}

    assert read_checkpoint(ort.initial).optimizer is None  # the exporter's checkpoint: parameters only
    ck3 = read_checkpoint(ort.ck3)
    assert list(ck3.parameters) == sorted(TRAINABLE)  # ORT's save order: by name
    _assert_same_tensors(ck3.parameters, {n: ort.first[f"param:{n}"] for n in TRAINABLE})
    opt = ck3.optimizer
    assert opt.group_name == "group0" and opt.step == 3
    assert opt.initial_learning_rate == opt.learning_rate == float(np.float32(1e-3))  # ORT's default; not ours
    # The moments are AdamW's first and second moments of ORT's own gradients (in that order, not swapped).
    a, b = ort.adamw["alpha"], ort.adamw["beta"]
    for name in TRAINABLE:
        grads = ort.first[f"grad:{name}"].astype(np.float64)
        m = v = np.zeros_like(grads[0])
        for g in grads:
            m, v = a * m + (1 - a) * g, b * v + (1 - b) * g * g
        assert opt.first_moments[name].dtype == np.float32 and opt.first_moments[name].shape == m.shape
        assert np.abs(opt.first_moments[name]).max() > 0
        np.testing.assert_allclose(opt.first_moments[name], m, rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(opt.second_moments[name], v, rtol=1e-5, atol=1e-12)


# -- (2) ORT resumes from what we write exactly as from its own file -------------------------------------------

def test_ort_resumes_from_our_rewrite_bit_identically(ort):
    theirs, mine = ort.npz("cont_theirs.npz"), ort.npz("cont_ours.npz")
    assert set(theirs) == set(mine)
    for key in theirs:  # losses, every step's gradients, final parameters: bit for bit
        assert np.array_equal(theirs[key], mine[key]), key
    # ORT's own checkpoints after the 2 further steps are byte-identical too (adapters, moments, step 5) ...
    assert (ort.root / "after_ours").read_bytes() == (ort.root / "after_theirs").read_bytes()
    assert read_checkpoint(ort.root / "after_ours").optimizer.step == 5
    # ... and ORT, loading our file and saving what it loaded, writes ORT's original file byte for byte.
    assert (ort.root / "ours3.resaved").read_bytes() == ort.ck3.read_bytes()
    assert ort.results["ours3"]["learning_rate"] == pytest.approx(1e-3)
    assert not list(ort.root.glob("*.tmp"))


# -- (3) a checkpoint we build from scratch, with values of our own --------------------------------------------

def test_ort_loads_and_trains_on_a_checkpoint_built_from_scratch(ort):
    built, ck3 = ort.scratch, read_checkpoint(ort.ck3)
    params, m, v = built.parameters, built.optimizer.first_moments, built.optimizer.second_moments
    dump = ort.results["scratch"]

    # What ORT loaded, and saves back: our parameters, moments, step, initial LR and properties.
    assert dump["requires_grad"] == {n: True for n in TRAINABLE}
    assert dump["properties"] == {**built.properties, LEARNING_RATE_PROPERTY: pytest.approx(0.02)}
    resaved = read_checkpoint(ort.root / "scratch.resaved")
    _assert_same_tensors(resaved.parameters, params)
    _assert_same_tensors(resaved.optimizer.first_moments, m)
    _assert_same_tensors(resaved.optimizer.second_moments, v)
    assert resaved.optimizer.step == 7
    assert resaved.optimizer.initial_learning_rate == float(np.float32(0.0025))
    assert resaved.optimizer.learning_rate == float(np.float32(0.02))
    assert resaved.properties == built.properties

    # Training from it: the same parameters give the same loss and gradients as from ck3, but ORT's AdamW update
    # uses our moments and step (and not ck3's): it matches AdamW run by hand on those.
    step, base = ort.npz("scratch_step.npz"), ort.npz("ck3_step.npz")
    assert np.array_equal(step["loss"], base["loss"])
    after = read_checkpoint(ort.root / "scratch_after")
    assert after.optimizer.step == 8
    for n in TRAINABLE:
        grad = step[f"grad:{n}"][0]
        assert np.array_equal(grad, base[f"grad:{n}"][0])
        want_p, want_m, want_v = _adamw_reference(ort.adamw, params[n], grad, m[n], v[n], 8, LR)
        was_p, _, _ = _adamw_reference(ort.adamw, params[n], grad, ck3.optimizer.first_moments[n],
                                       ck3.optimizer.second_moments[n], 4, LR)
        assert not np.allclose(want_p - params[n], was_p - params[n], rtol=1e-2)  # the check can tell them apart
        np.testing.assert_allclose(step[f"param:{n}"] - params[n], want_p - params[n], rtol=1e-3, atol=1e-7)
        np.testing.assert_allclose(after.optimizer.first_moments[n], want_m, rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(after.optimizer.second_moments[n], want_v, rtol=1e-5, atol=1e-12)
        assert not np.array_equal(step[f"param:{n}"], base[f"param:{n}"])


def test_ort_sees_every_dtype_frozen_flag_and_property_we_write(ort):
    built, dump = ort.dtypes, ort.results["dtypes"]
    assert set(dump["names"]) == set(built.parameters) and dump["requires_grad"] == built.requires_grad
    assert dump["properties"] == built.properties
    seen, ours = ort.npz("dtypes.dump.npz"), read_checkpoint(ort.root / "dtypes")
    frozen = sorted(n for n, grad in built.requires_grad.items() if not grad)
    assert list(ours.parameters) == ["f32", "one", *frozen]  # trainable first, each part by name
    for name, value in built.parameters.items():
        want = value.astype(value.dtype.newbyteorder("="))
        for got in (seen[name], ours.parameters[name]):
            assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want), name
    assert ours.requires_grad == built.requires_grad and ours.optimizer is None
    assert ours.properties == built.properties


# -- (4) damaged files: a one-line BundleError naming the file, never a crash or a hang ---------------------------

def _assert_rejected(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    with pytest.raises(BundleError) as info:
        read_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message


def test_truncated_zeroed_and_random_files_raise_bundle_error(ort, tmp_path):
    good = ort.ck3.read_bytes()
    bad = tmp_path / "bad-checkpoint"
    rng = np.random.default_rng(3)
    cuts = sorted({*range(0, 300), *rng.integers(300, len(good), 300).tolist(), len(good) - 1})
    whole = read_checkpoint(ort.ck3)
    for cut in cuts:
        if cut >= len(good) - 8 and not good[cut:].strip(b"\0"):  # only trailing padding cut off: still whole
            bad.write_bytes(good[:cut])
            _assert_same_tensors(read_checkpoint(bad).optimizer.second_moments, whole.optimizer.second_moments)
        else:
            _assert_rejected(bad, good[:cut])
    _assert_rejected(bad, b"\0" * len(good))
    _assert_rejected(bad, b"")
    for size in (4, 8, 64, 4096, len(good)):
        _assert_rejected(bad, rng.bytes(size))
        _assert_rejected(bad, b"\x10\0\0\0ODTC" + rng.bytes(size))  # right identifier, random tables
    _assert_rejected(bad, b"PK\x03\x04" + rng.bytes(1000))  # some other file
    _assert_rejected(bad, b"\x08\x07\x12\x04onnx" + rng.bytes(100))  # an ONNX model's first bytes
    message = str(pytest.raises(BundleError, read_checkpoint, tmp_path / "missing").value)
    assert str(tmp_path / "missing") in message


def test_corrupted_bytes_never_escape_as_another_error(ort, tmp_path):
    """Flip bytes all over a real checkpoint (most of its metadata lies in the first bytes and between tensors):
    the result is either a readable checkpoint (a flip inside tensor data) or a BundleError, nothing else."""
    good = bytearray(ort.ck3.read_bytes())
    bad = tmp_path / "flipped"
    rng = np.random.default_rng(4)
    positions = [*range(0, 400), *rng.integers(0, len(good), 800).tolist()]
    rejected = 0
    for i, pos in enumerate(positions):
        data = bytearray(good)
        data[pos] = (data[pos] + int(rng.integers(1, 256))) % 256 if i % 3 else 0xFF
        bad.write_bytes(data)
        try:
            read_checkpoint(bad)
        except BundleError as e:
            assert str(bad) in str(e) and "\n" not in str(e)
            rejected += 1
    assert rejected > 100


def _hand_written(module, version=2) -> bytes:
    """A checkpoint file of a hand-built ModuleState table (lars_artifacts.ort_checkpoint's own writer pieces)."""
    from lars_artifacts import ort_checkpoint as oc

    writer = oc._Writer()
    slot = writer.slot()
    writer.put(oc.FILE_IDENTIFIER)
    writer.patch(slot, writer.node(oc._OutTable((0, "i32", version), (1, "ref", module))))
    return b"".join(bytes(p) for p in writer.parts)


def _overlapping_names_file(tensors: int, words: int) -> bytes:
    """A hand-made checkpoint whose `tensors` tensors are named by strings that overlap in one region of `words`
    words (the name at word i runs to the region's end): valid offsets everywhere, but decoding every name would
    cost about tensors * words * 2 bytes of work."""
    b = bytearray(struct.pack("<I", 0) + b"ODTC")

    def put(fmt, *values):
        b.extend(struct.pack("<" + fmt, *values))
        return len(b) - struct.calcsize("<" + fmt)

    def point(slot, target):
        struct.pack_into("<I", b, slot, target - slot)

    vt = put("HHHH", 8, 12, 4, 8)  # Checkpoint {version, module_state}
    root = put("iiI", 0, 2, 0)
    struct.pack_into("<i", b, root, root - vt)
    point(0, root)
    vt = put("HHHH", 8, 12, 4, 8)  # ModuleState {requires_grad_params, frozen_params}
    module = put("iII", 0, 0, 0)
    struct.pack_into("<i", b, module, module - vt)
    point(root + 8, module)
    tensor_vt = put("HHHHHHHH", 14, 20, 4, 0, 8, 12, 16, 0)  # Tensor {name, dims, data_type, raw_data}
    point(module + 8, put("I", 0))
    point(module + 4, put("I", tensors))
    slots = len(b)
    b.extend(bytes(4 * tensors))
    tables = []
    for i in range(tensors):
        tables.append(put("iIIiI", 0, 0, 0, 1, 0))
        struct.pack_into("<i", b, tables[-1], tables[-1] - tensor_vt)
        point(slots + 4 * i, tables[-1])
    usable = [i for i in range(words) if max(struct.pack("<I", 4 * (words - 1 - i))) < 0x80]  # UTF-8 lengths
    used = set(usable[:tensors])
    region = len(b)
    for i in range(words):
        b.extend(struct.pack("<I", 4 * (words - 1 - i)) if i in used else b"    ")
    b.extend(bytes(4))
    while len(b) % 8 != 4:
        b.append(0)
    dims, raw = put("Iq", 1, 0), put("I", 0)  # shape [0], no bytes
    for i, table in enumerate(tables):
        point(table + 4, region + 4 * usable[i % len(usable)])
        point(table + 8, dims)
        point(table + 16, raw)
    return bytes(b)


def test_files_that_reuse_their_bytes_are_rejected_fast(tmp_path):
    """Offsets that make objects share bytes could make a reader do (or allocate) far more than the file holds:
    names overlapping in one region here (about 10 GB of decoding), raw data shared by many tensors below."""
    import time

    from lars_artifacts import ort_checkpoint as oc

    path = tmp_path / "checkpoint"
    start = time.monotonic()
    _assert_rejected(path, _overlapping_names_file(tensors=20000, words=250000))
    assert "share" in str(pytest.raises(BundleError, read_checkpoint, path).value)

    # Two tiny tensors and one of 1 MB; then the tiny ones re-pointed at the big one's shape and data (offsets
    # only point forward, so at the last one's): 3 MB of tensors out of a 1 MB file.
    tensors = [oc._OutTable((0, "ref", f"t{i}"), (2, "ref", oc._OutScalars(np.array([n], "<i8").tobytes(), 1, 8)),
                            (3, "i32", 1), (4, "ref", oc._OutScalars(np.full(n, i, "<f4").tobytes(), 4 * n, 16)))
               for i, n in enumerate((1, 1, 1 << 18))]
    module = oc._OutTable((0, "ref", oc._OutVector(tensors)), (1, "ref", oc._OutVector([])))
    data = bytearray(_hand_written(module))
    path.write_bytes(data)
    assert [t.shape for t in read_checkpoint(path).parameters.values()] == [(1,), (1,), (1 << 18,)]
    buf = oc._Buffer(bytes(data))
    tables = buf.table(buf.offset(0, "root"), "root").table(1, "module").tables(0, "params")
    for field in (2, 4):
        target = tables[2].ref(field, "")
        for table in tables[:2]:
            slot = table.pos + table.fields[field]
            struct.pack_into("<I", data, slot, target - slot)
    _assert_rejected(path, bytes(data))
    assert "share" in str(pytest.raises(BundleError, read_checkpoint, path).value)
    assert time.monotonic() - start < 10


def test_unsupported_features_are_named(tmp_path):
    from lars_artifacts import ort_checkpoint as oc

    def file_with(module_fields=(), tensor_fields=(), version=oc.CHECKPOINT_VERSION, data_type=1):
        tensor = oc._OutTable((0, "ref", "w"), (2, "ref", oc._OutScalars(np.array([2], "<i8").tobytes(), 1, 8)),
                              (3, "i32", data_type), *tensor_fields)
        module = oc._OutTable((0, "ref", oc._OutVector([tensor])), (1, "ref", oc._OutVector([])),
                              *module_fields)
        return _hand_written(module, version)

    path = tmp_path / "checkpoint"
    for data, words in ((file_with(module_fields=[(3, "bool", 1)]), "external data"),
                        (file_with(module_fields=[(2, "bool", 1)]), "nominal"),
                        (file_with(tensor_fields=[(6, "i64", 0)]), "external data"),
                        (file_with(version=3), "version 3"),
                        (file_with(data_type=16), "data type 16")):  # bfloat16
        path.write_bytes(data)
        message = str(pytest.raises(BundleError, read_checkpoint, path).value)
        assert str(path) in message and "not supported" in message and words in message
    path.write_bytes(file_with(tensor_fields=[(4, "ref", oc._OutScalars(np.zeros(2, "<f4").tobytes(), 8, 16))]))
    assert np.array_equal(read_checkpoint(path).parameters["w"], np.zeros(2, np.float32))
    half = np.array([1.5, -2], "<f2")  # readable, though ORT 1.19.2 neither writes nor loads it
    path.write_bytes(file_with(tensor_fields=[(4, "ref", oc._OutScalars(half.tobytes(), 4, 16))], data_type=10))
    assert np.array_equal(read_checkpoint(path).parameters["w"], half)


# -- writing ------------------------------------------------------------------------------------------------------

def test_write_validates_before_touching_the_file(tmp_path):
    path = tmp_path / "checkpoint"
    params = {"a": np.ones((2, 3), np.float32), "frozen": np.zeros(4, np.float32)}
    good = OrtCheckpoint(parameters=params, requires_grad={"a": True, "frozen": False}, properties={},
                         optimizer=OptimizerState(step=1, learning_rate=1e-3, initial_learning_rate=1e-3,
                                                  first_moments={"a": np.ones((2, 3), np.float32)},
                                                  second_moments={"a": np.ones((2, 3), np.float32)}))
    write_checkpoint(path, good)
    before = path.read_bytes()
    wrong = [
        dict(first_moments={"a": np.ones((3, 2), np.float32)}),  # shape
        dict(first_moments={"a": np.ones((2, 3), np.float32), "frozen": np.zeros(4, np.float32)}),  # not trainable
        dict(second_moments={}),  # missing
        dict(step=-1),
    ]
    for change in wrong:
        opt = OptimizerState(**{**good.optimizer.__dict__, **change})
        with pytest.raises(ValueError):
            write_checkpoint(path, OrtCheckpoint(params, good.requires_grad, opt, {}))
    for bad in (OrtCheckpoint({"s": np.array(["x"])}, {"s": False}), OrtCheckpoint(params, {"z": True}),
                OrtCheckpoint({"h": np.ones(2, np.float16)}, {"h": False}),  # ORT 1.19.2 cannot load float16
                OrtCheckpoint(params, good.requires_grad, None, {"flag": True}),
                OrtCheckpoint(params, good.requires_grad, None, {"list": [1]})):
        with pytest.raises(ValueError):
            write_checkpoint(path, bad)
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["checkpoint"]
    back = read_checkpoint(path)
    assert back.requires_grad == {"a": True, "frozen": False} and back.optimizer.step == 1


def test_codec_needs_neither_onnxruntime_nor_torch():
    code = ("import sys, lars_artifacts.ort_checkpoint; "
            "bad = {'onnxruntime', 'torch'} & set(sys.modules); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
