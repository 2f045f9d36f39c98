"""Forward-only training (--method zo, lars_ort/zo.py and lars_export/zo_step.py): the batched forward equals the eval
graph per adapter setting, the P-RGE estimate against the true gradient (the backprop step's, itself checked against
PyTorch + PEFT in test_numerics), LoRA-FA, a run that lowers the loss, resume bit for bit, and the errors."""

import json
import subprocess
import sys

import numpy as np
import pytest

from lars_artifacts import load_bundle
from lars_artifacts.ort_checkpoint import read_checkpoint
from lars_ort import Trainer, TrainingArgs, train
from lars_ort.checkpoint import latest
from lars_ort.zo import ZoConfig
from tiny import TRAIN_TEXT, random_lora_b


@pytest.fixture(scope="module")
def setup(tiny_bundles):
    """The exact tiny llama bundle, random B (so every gradient is non-zero) and a batch with padding and prompt."""
    bundle = tiny_bundles["llama"]
    exact = Trainer(bundle, load_eval=False, threads=1)
    rng = np.random.default_rng(3)
    adapters = random_lora_b(exact, rng)
    mask = np.ones((2, 24), np.int64)
    mask[1, 17:] = 0
    batch = exact.batch(rng.integers(1, exact.bundle.manifest.vocab_size, size=(2, 24)), mask)
    batch.labels[0, :5] = -100
    loss = exact.engine.forward_backward(batch)
    return bundle, adapters, batch, loss, exact.engine.gradients()


def _zo(bundle, adapters, **config):
    trainer = Trainer(bundle, load_eval=False, threads=1, method="zo", zo=ZoConfig(**config))
    trainer.engine.set_adapter_tensors(adapters)
    return trainer.engine


def _flat(engine, tensors):
    return np.concatenate([tensors[n].ravel() for n in engine.perturbed]).astype(np.float64)


def test_batched_forward_equals_the_eval_graph_per_setting(setup):
    bundle, adapters, batch, loss, _ = setup
    engine = _zo(bundle, adapters, parallel=2)
    assert engine.batched and engine.session._model_path.endswith("zo_step.onnx")
    assert engine.eval_step(batch) == pytest.approx(loss, rel=1e-6)
    zs = [engine.direction(0, i) for i in range(3)]
    settings = [(zs[0], 0.05), (zs[0], -0.05), (zs[1], 0.02), None, (zs[2], -0.1)]
    together = engine._losses(batch, settings)
    one_by_one = [engine._losses(batch, [s])[0] for s in settings]
    np.testing.assert_allclose(together, one_by_one, rtol=2e-6)
    # one setting per run: the training step's forward (memory passes, chunked loss): the same losses to rounding
    single = _zo(bundle, adapters)
    assert not single.batched and single.session._model_path.endswith("zo_forward.onnx")
    np.testing.assert_allclose([single._losses(batch, [s])[0] for s in settings], together, rtol=1e-5)

    # The same settings through ORT's eval graph, one run per setting (the fallback of bundles without zo_step):
    # the adapters it is fed are θ + s·z exactly.
    eval_only = load_bundle(bundle)
    eval_only.manifest.models["ort"]["zo"] = {"file": None, "forward": None, "reason": "a test says so"}
    fallback = _zo(eval_only, adapters)
    assert not fallback.batched and fallback.session._model_path.endswith("eval_model.onnx")
    np.testing.assert_allclose([fallback._losses(batch, [s])[0] for s in settings], together, rtol=2e-6)
    assert len(set(np.round(together, 6))) == len(settings)  # the perturbations did change the loss
    with pytest.raises(Exception, match=r"--zo-parallel 2 needs the bundle's zo_step.onnx.*a test says so"):
        _zo(eval_only, adapters, parallel=2)


def test_forward_graph_keeps_the_loss_chunks_in_order_without_their_gradients(tiny_bundles):
    """The training step finishes each loss chunk's dh in the forward (chunked_loss) and orders the chunks on it;
    zo_forward.onnx drops that work and orders chunk i on chunk i-1's log-probabilities instead."""
    import onnx

    bundle = load_bundle(tiny_bundles["llama"])
    chunks = bundle.manifest.exporter["config"]["loss_chunks"]
    assert chunks >= 2

    def nodes(name):
        return onnx.load(bundle.file(name), load_external_data=False).graph.node

    step, forward = nodes(bundle.manifest.models["ort"]["training"]), nodes("zo_forward.onnx")
    unit_grads = [n for n in step if n.name.startswith("/ChunkedLoss/dH") and n.name[len("/ChunkedLoss/dH"):]]
    assert len(unit_grads) == chunks
    assert not [n.name for n in forward if n.name.startswith(("/ChunkedLoss/dH", "/ChunkedLoss/CEGrad"))]
    for i in range(1, chunks):
        waits_for = {n.input[0] for n in forward if n.op_type == "Size"
                     and n.name.startswith(f"/ChunkedLoss/fwd{i}/Gate/forward/")}
        assert f"/ChunkedLoss/logp_chunk{i - 1}" in waits_for, waits_for


def test_forward_of_keeps_gates_it_needs_and_regates_the_others():
    """x -> a -> b -> loss, with side work s = a·a that is not on the loss' path (like a loss chunk's gradient):
    a gate on b waiting for a stays; one on b waiting for s re-gates on a (what s came from that the forward
    computes); one waiting for work on the inputs alone becomes an Identity. The pruned graph runs in onnxruntime
    and gives the training graph's loss."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    import onnx_ir as ir

    from lars_export.passes import _ir
    from lars_export.zo_step import forward_of

    def graph(after: str):
        model = helper.make_model(helper.make_graph(
            [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Mul", ["a", "a"], ["s"]),
             helper.make_node("Neg", ["x"], ["n"]), helper.make_node("Sigmoid", ["a"], ["b"])], "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T"])],
            [helper.make_tensor_value_info("s", TensorProto.FLOAT, ["T"])]),
            opset_imports=[helper.make_opsetid("", 17)])
        ir_model = _ir.to_ir(model, None)
        values = _ir.values_by_name(ir_model.graph)
        gate, (gated,) = _ir.gate_all(ir_model.graph, "/g", [values["b"]], [values[after]])
        loss = ir.node("ReduceSum", [gated], {"keepdims": 0}, outputs=[ir.Value(name="loss")])
        loss.outputs[0].type, loss.outputs[0].shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape([])
        ir_model.graph.extend([*gate, loss])
        ir_model.graph.outputs.insert(0, loss.outputs[0])
        _ir.into_proto(ir_model, model)
        return model

    x = np.array([-1.0, 0.5, 2.0], np.float32)
    expected = float(np.sum(1 / (1 + np.exp(-np.maximum(x, 0)))))
    for after, waits_for in (("a", {"a"}), ("s", {"a"}), ("n", set())):
        model = forward_of(graph(after), "loss")
        onnx.checker.check_model(model)
        names = {o for n in model.graph.node for o in n.output}
        assert "s" not in names and ("n" not in names or after == "a")
        out = _ir.values_by_name(_ir.to_ir(model, None).graph)["/g/gated"].producer()
        # the gate itself, or an Identity of the re-gated (or ungated) value
        opener = _ir.gate_of(out.inputs[0] if out.op_type == "Identity" else out.outputs[0])
        if waits_for:
            assert (out.op_type == "Identity") == (after != "a")
            assert {v.name for v in _ir.gate_waits_for(opener)} == waits_for, after
        else:
            assert out.op_type == "Identity" and out.inputs[0].name == "b"
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        assert session.run(None, {"x": x})[0] == pytest.approx(expected, rel=1e-6)


def test_zo_step_refuses_an_eval_graph_it_cannot_batch_and_leaves_it_as_it_was(tiny_bundles):
    """build_zo_step checks every adapter and the loss before it changes anything: a graph it cannot rewrite raises
    ZoStepUnsupported naming what is wrong (the bundle is then written without zo_step.onnx) and stays intact."""
    import copy

    import onnx
    from onnx import helper

    from lars_artifacts import EVAL_MODEL
    from lars_export.zo_step import ZoStepUnsupported, build_zo_step

    bundle = tiny_bundles["llama"]
    names = [p.onnx_name for p in load_bundle(bundle).manifest.adapter_parameters]
    model = onnx.load(str(bundle / EVAL_MODEL), load_external_data=False)
    assert len(build_zo_step(copy.deepcopy(model), names).graph.input) == len(model.graph.input)  # the original works

    def last_adapter_read_twice(m):  # a second reader of the last adapter, after the others were checked
        m.graph.node.append(helper.make_node("Identity", [names[-1]], ["extra"]))

    def loss_summed(m):
        loss = next(n for n in m.graph.node if n.op_type == "SoftmaxCrossEntropyLoss")
        next(a for a in loss.attribute if a.name == "reduction").s = b"sum"

    for damage, message in ((last_adapter_read_twice, f"adapter tensor {names[-1]} is not read by one Transpose"),
                            (loss_summed, "the eval graph's loss is not a mean over the labels input"),
                            (lambda m: None, "does not take adapter tensor nope as an input")):
        damaged = copy.deepcopy(model)
        damage(damaged)
        before = damaged.SerializeToString()
        with pytest.raises(ZoStepUnsupported, match=message):
            build_zo_step(damaged, names + ["nope"] if message.endswith("nope as an input") else names)
        assert damaged.SerializeToString() == before


def test_two_sided_difference_is_the_directional_derivative(setup):
    bundle, adapters, batch, _, grads = setup
    engine = _zo(bundle, adapters)
    g = _flat(engine, grads)
    for i in range(4):
        z = engine.direction(0, i)
        exact = float(g @ z)
        error = {}
        for eps in (1e-2, 3e-3, 1e-3):
            plus, minus = engine._losses(batch, [(z, eps)])[0], engine._losses(batch, [(z, -eps)])[0]
            error[eps] = (float(plus) - float(minus)) / (2 * eps) - exact
        # measured: 3e-4 at most at ε = 1e-3 (|g·z| 0.26-1.15), where float32 rounding (~1e-6 / ε) starts to matter
        assert abs(error[1e-3]) < 1e-3, (i, exact, error)
        # a two-sided difference is second-order: the error falls as ε² (0.09x from 1e-2 to 3e-3) above that floor
        if abs(error[1e-2]) > 1e-3:
            assert 0.03 < error[3e-3] / error[1e-2] < 0.2, (i, exact, error)


def test_estimate_converges_to_the_gradient(setup):
    """E[ĝ] = ∇L: with q = 6 d directions the estimate's cosine to the true gradient is ~0.93 (1/sqrt(1 + d/q));
    one step with lr = 0 returns ĝ as the engine's gradients and leaves the adapters as they were."""
    bundle, adapters, batch, _, grads = setup
    engine = _zo(bundle, adapters, perturbations=1, parallel=2, eps=1e-2)
    q = 6 * engine.dimension
    engine = _zo(bundle, adapters, perturbations=q, parallel=512, eps=1e-2)
    engine.train_step(batch, 0.0)
    estimate, g = _flat(engine, engine.gradients()), _flat(engine, grads)
    cosine = estimate @ g / (np.linalg.norm(estimate) * np.linalg.norm(g))
    assert cosine > 0.9, cosine
    assert np.linalg.norm(estimate) / np.linalg.norm(g) == pytest.approx(np.sqrt(1 + engine.dimension / q), rel=0.1)
    for name, value in engine.adapter_tensors().items():
        np.testing.assert_array_equal(value, adapters[name], err_msg=name)
    a_grads = [v for n, v in engine.gradients().items() if n not in engine.perturbed]
    assert a_grads and all(not v.any() for v in a_grads)  # LoRA-FA: A is not estimated


def test_lora_fa_trains_b_only_and_off_trains_a_too(setup):
    bundle, adapters, batch, _, _ = setup
    for lora_fa in (True, False):
        engine = _zo(bundle, adapters, lora_fa=lora_fa, perturbations=2)
        engine.train_step(batch, 1e-2)
        after = engine.adapter_tensors()
        changed = {n for n in after if not np.array_equal(after[n], adapters[n])}
        b_names = {n for n in after if ".lora_B." in n}
        assert changed == (b_names if lora_fa else set(after)), lora_fa
        assert engine.step_count == 1


def test_update_is_sgd_on_the_estimate(setup):
    bundle, adapters, batch, _, _ = setup
    engine = _zo(bundle, adapters, perturbations=3, parallel=6)
    loss = engine.train_step(batch, 0.5)
    estimate = engine.gradients()
    for name in engine.perturbed:
        np.testing.assert_allclose(engine.adapter_tensors()[name], adapters[name] - np.float32(0.5) * estimate[name],
                                   rtol=1e-6, atol=1e-7, err_msg=name)
    assert loss == pytest.approx(setup[3], abs=1e-3)  # the mean of the ± losses is the loss at θ to O(ε²)


def test_steps_lower_the_loss(setup):
    """20 steps on one batch (q = 4, ε = 1e-3, lr = 0.05): the loss at θ falls (measured 5.926 -> 5.813; plain SGD
    on the true gradient would expect ~lr |∇L|² = 0.01 per step, |∇L| = 0.45)."""
    bundle, adapters, batch, loss, _ = setup
    engine = _zo(bundle, adapters, perturbations=4, parallel=8)
    for _ in range(20):
        engine.train_step(batch, 0.05)
    assert engine.eval_step(batch) < loss - 0.05


def _args(out, **kw):
    base = dict(data=str(TRAIN_TEXT), out=str(out), steps=6, batch_size=2, seq_len=32, lr=3e-2, warmup_steps=0,
                save_every=2, seed=3, progress=False, threads=1, method="zo", zo_perturbations=4, zo_parallel=4,
                zo_eps=1e-2)
    return TrainingArgs(**{**base, **kw})


def test_zo_run_resumes_bit_for_bit(tiny_bundles, tmp_path):
    bundle = tiny_bundles["llama"]
    def interrupt_at_3(record):
        if record.get("step") == 3 and "loss" in record:
            raise KeyboardInterrupt

    short = train(bundle, _args(tmp_path / "short"))
    with pytest.raises(KeyboardInterrupt):
        train(bundle, _args(tmp_path / "split"), callbacks=[interrupt_at_3])
    resumed = train(bundle, _args(tmp_path / "split", resume=True))
    assert resumed["start_step"] == 3 and resumed["losses"] == short["losses"][3:]
    a = read_checkpoint(latest(tmp_path / "short").ort_checkpoint).parameters
    b = read_checkpoint(latest(tmp_path / "split").ort_checkpoint).parameters
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert any(np.abs(v).max() > 0 for k, v in a.items() if ".lora_B." in k)

    # the same resume with another method or q is refused by name
    with pytest.raises(Exception, match=r"--method backprop \(was zo\).*--resume-with-changes"):
        train(bundle, _args(tmp_path / "split", resume=True, method="backprop", steps=8))


def test_cli_trains_with_zo_and_refuses_bad_settings(tiny_bundles, tmp_path):
    bundle = str(tiny_bundles["qwen2"])
    base = [sys.executable, "-m", "lars_ort.cli", "train", bundle, "--data", str(TRAIN_TEXT), "--steps", "2",
            "--batch-size", "1", "--seq-len", "16", "--no-progress", "--threads", "1", "--method", "zo"]
    ok = subprocess.run([*base, "--out", str(tmp_path / "run"), "--zo-parallel", "2"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    for extra, message in ((["--zo-parallel", "3"], "--zo-parallel must be 1 or even"),
                           (["--backend", "ort-training"], "--method zo runs the bundle's forward on plain "
                                                           "onnxruntime"),
                           (["--zo-eps", "0"], "--zo-eps must be above 0"),
                           (["--method", "sgd"], "invalid choice: 'sgd'")):
        bad = subprocess.run([*base, "--out", str(tmp_path / "bad"), *extra], capture_output=True, text=True)
        assert bad.returncode != 0 and message in bad.stderr, (extra, bad.stderr)
        assert "Traceback" not in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_eps_schedule():
    constant = ZoConfig(eps=1e-3, steps=10)
    assert [constant.eps_at(s) for s in (0, 5, 9)] == [1e-3] * 3
    linear = ZoConfig(eps=1e-3, eps_schedule="linear", eps_min_ratio=0.1, steps=10)
    assert linear.eps_at(0) == pytest.approx(1e-3) and linear.eps_at(5) == pytest.approx(5.5e-4)
    assert linear.eps_at(10) == pytest.approx(1e-4)
    cosine = ZoConfig(eps=1e-3, eps_schedule="cosine", eps_min_ratio=0.1, steps=10)
    assert cosine.eps_at(5) == pytest.approx(5.5e-4) and cosine.eps_at(10) == pytest.approx(1e-4)
    assert ZoConfig(parallel=3).problem() == "--zo-parallel must be 1 or even (pairs of + and - perturbations), got 3"
