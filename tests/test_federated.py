"""Federated fine-tuning on Flower (lars_ort.federated): the weighted mean, the checks that keep a bad update out,
a device's round against the same steps taken by hand, and whole federations on the tiny bundle (Flower's
simulation engine in this process; the deployment engine with TLS through tools/federated_demo.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lars_artifacts import LarsError, load_bundle
from lars_artifacts.ort_checkpoint import read_checkpoint
from lars_ort import Trainer
from lars_ort.data import BatchStream, eval_batches, load_sequences
from lars_ort.federated.aggregate import update_problem, weighted_mean
from lars_ort.federated.local import LocalClient, LocalData
from lars_ort.optimizer import AdamW
from tiny import EVAL_TEXT, TRAIN_TEXT, peft_step

REPO = Path(__file__).resolve().parent.parent
SEQ = 32


@pytest.fixture(autouse=True)
def _environment_restored():
    """Flower's simulation engine sets PYTHONPATH in this process for its Ray workers; later tests (and their child
    processes: the torch-free environment's pip) must not inherit it."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def _adapter(seed, shapes=(("a", (4, 3)), ("b", (2, 4)))):
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes}


def test_weighted_mean_is_fedavg_in_float64():
    updates = [_adapter(s) for s in range(3)]
    weights = [100, 7, 1]
    mean = weighted_mean(updates, weights)
    for name in updates[0]:
        expected = sum(np.float64(w) * u[name].astype(np.float64) for u, w in zip(updates, weights)) / sum(weights)
        assert mean[name].dtype == np.float32
        np.testing.assert_allclose(mean[name], expected.astype(np.float32), rtol=0, atol=0)
    # one update: itself
    assert all(np.array_equal(weighted_mean(updates[:1], [5])[n], updates[0][n]) for n in updates[0])
    with pytest.raises(ValueError, match="one weight per update"):
        weighted_mean(updates, [1, 2])


@pytest.mark.parametrize("change, weight, message", [
    (lambda u: u.pop("b"), 10, "lacks 1 tensor(s) (b)"),
    (lambda u: u.update(c=np.zeros(1, np.float32)), 10, "has 1 unknown tensor(s) (c)"),
    (lambda u: u.update(a=np.zeros((3, 4), np.float32)), 10, "a has shape [3, 4], the adapter's is [4, 3]"),
    (lambda u: u.update(a=u["a"].astype(np.float64)), 10, "a is float64, the adapter's is float32"),
    (lambda u: u["b"].__setitem__((1, 2), np.nan), 10, "b holds NaN or inf"),
    (lambda u: u["a"].__setitem__((0, 0), np.inf), 10, "a holds NaN or inf"),
    (lambda u: None, 0, "weight (token count) 0 is not a finite number > 0"),
    (lambda u: None, float("nan"), "weight (token count) nan"),
    (lambda u: None, True, "weight (token count) True"),
    (lambda u: None, None, "weight (token count) None"),
])
def test_a_bad_update_is_named(change, weight, message):
    reference, update = _adapter(0), _adapter(1)
    assert update_problem(reference, update, 10) is None
    change(update)
    assert message in update_problem(reference, update, weight)


def _local(bundle, state=None, data=TRAIN_TEXT, **kw):
    return LocalClient(bundle, LocalData(train=str(data), eval=str(EVAL_TEXT), seq_len=SEQ, **kw), state)


def test_a_local_round_is_adamw_from_the_global_adapter_and_resumes_its_data(tiny_bundles, tiny_models, tmp_path):
    bundle = load_bundle(tiny_bundles["llama"])
    client = _local(bundle, tmp_path / "state.json")
    start = client.trainer.adapter_tensors()
    start = {n: v + np.float32(0.01) for n, v in start.items()}  # a global adapter with B != 0
    tensors, metrics = client.fit(start, steps=3, lr=1e-2)

    # by hand: a fresh trainer (fresh AdamW), the same adapter, the first three batches of the same stream
    trainer = Trainer(bundle, load_eval=False, backend="ort")
    trainer.engine.set_adapter_tensors(start)
    seqs = load_sequences(TRAIN_TEXT, trainer.tokenizer, SEQ)
    stream = BatchStream(seqs, 1, trainer.tokenizer.pad_id, 0)
    batches = [stream.next() for _ in range(6)]
    losses = [trainer.step(b, 1e-2) for b in batches[:3]]
    for name, value in trainer.adapter_tensors().items():
        np.testing.assert_array_equal(tensors[name], value)
    assert metrics["train_loss"] == pytest.approx(np.mean(losses), rel=1e-6)
    assert metrics["num-tokens"] == sum(b.label_tokens for b in batches[:3]) and metrics["num-examples"] == 3

    # the next round starts AdamW afresh and continues the data; so does a restarted device (the state file)
    again = client.fit(start, steps=3, lr=1e-2)[0]
    restarted = _local(bundle, tmp_path / "state.json")
    restarted.stream.epoch, restarted.stream.index = 0, 0
    restarted._restore()
    assert restarted.position() == client.position()
    fresh = Trainer(bundle, load_eval=False, backend="ort")
    fresh.engine.set_adapter_tensors(start)
    for b in batches[3:]:
        fresh.step(b, 1e-2)
    for name, value in fresh.adapter_tensors().items():
        np.testing.assert_array_equal(again[name], value)
    # another data file: the position means nothing there
    other = _local(bundle, tmp_path / "state.json", data=EVAL_TEXT)
    assert (other.stream.epoch, other.stream.index) == (0, 0)
    # the held-out loss of an adapter: the token-weighted cross-entropy PyTorch + PEFT gives with it, batch by batch
    score = client.evaluate(start)
    total, tokens = 0.0, 0
    for batch in eval_batches(client.held, 1, client.trainer.tokenizer.pad_id):
        loss, _ = peft_step(tiny_models["llama"], bundle, start, batch)
        total, tokens = total + loss * batch.label_tokens, tokens + batch.label_tokens
    assert tokens > SEQ and score["num-tokens"] == tokens
    assert score["eval_loss"] == pytest.approx(total / tokens, rel=1e-5)


def test_two_devices_with_the_same_files_in_one_process_keep_their_own_data_positions(tiny_bundles):
    """Simulation workers serve several virtual devices with one cached LocalClient when their files are the same:
    each device's first round starts at its own (zero) position, later rounds continue its own."""
    from flwr.app import Context, RecordDict

    from lars_ort.federated.client_app import _fit, device_settings

    config = {"bundle": str(tiny_bundles["llama"]), "data": str(TRAIN_TEXT), "seq-len": SEQ, "local-steps": 2}
    a, b = (Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config=config) for n in (1, 2))
    start = _local(load_bundle(tiny_bundles["llama"])).trainer.adapter_tensors()
    first_a = _fit(a, device_settings(a), start, {"lr": 1e-2})[0]
    first_b = _fit(b, device_settings(b), start, {"lr": 1e-2})[0]  # not where device a stopped
    second_a = _fit(a, device_settings(a), start, {"lr": 1e-2})[0]
    for name in start:
        np.testing.assert_array_equal(first_a[name], first_b[name])
    assert any(not np.array_equal(first_a[n], second_a[n]) for n in start)  # a continued its own data


def test_fedprox_adds_mu_times_the_distance_to_the_global_adapter(tiny_bundles):
    bundle = load_bundle(tiny_bundles["llama"])
    mu, lr = 0.5, 1e-2
    client = _local(bundle)
    start = client.trainer.adapter_tensors()
    prox = client.fit(start, steps=2, lr=lr, proximal_mu=mu)[0]

    # by hand: step 1 as FedAvg (the distance is 0), step 2's gradient + mu * (w1 - w0), AdamW (step 2)
    trainer = Trainer(bundle, load_eval=False, backend="ort")
    engine = trainer.engine
    engine.set_adapter_tensors(start)
    w0 = engine.params.copy()
    stream = BatchStream(load_sequences(TRAIN_TEXT, trainer.tokenizer, SEQ), 1, trainer.tokenizer.pad_id, 0)
    trainer.step(stream.next(), lr)
    m1, m2 = engine.m1.copy(), engine.m2.copy()
    w1 = engine.params.copy()
    engine.forward_backward(stream.next())
    grads = engine.grads + np.float32(mu) * (w1 - w0)
    expected = w1.copy()
    AdamW(engine.optimizer.config, expected.size).update(expected, grads, m1, m2, lr, 2)
    engine.params[...] = expected
    for name, value in trainer.adapter_tensors().items():
        np.testing.assert_allclose(prox[name], value, rtol=0, atol=1e-7)
    plain = _local(bundle).fit(start, steps=2, lr=lr)[0]
    assert any(not np.allclose(plain[n], prox[n]) for n in plain)


def test_a_global_adapter_of_another_bundle_is_refused(tiny_bundles):
    client = _local(load_bundle(tiny_bundles["llama"]))
    wrong = {n: v[..., :1] for n, v in client.trainer.adapter_tensors().items()}
    with pytest.raises(LarsError, match="the global adapter does not fit bundle .*every device must train the bundle"):
        client.fit(wrong, steps=1, lr=1e-3)
    with pytest.raises(LarsError, match="local steps 0 must be an integer >= 1"):
        client.fit(client.trainer.adapter_tensors(), steps=0, lr=1e-3)
    # a round's steps are the Trainer's: its learning-rate check holds, and nothing is trained or saved
    before = client.trainer.adapter_tensors()
    with pytest.raises(LarsError, match="learning rate nan must be a finite number >= 0"):
        client.fit(before, steps=1, lr=float("nan"))
    assert client.rounds == 0 and client.stream.index == 0


def test_a_proximal_term_on_zeroth_order_steps_is_refused(tiny_bundles):
    from lars_ort import Trainer
    from lars_ort.zo import ZoConfig

    trainer = Trainer(tiny_bundles["llama"], load_eval=False, method="zo", zo=ZoConfig(perturbations=2))
    batch = trainer.text_batch(["To be, or not to be"])
    with pytest.raises(LarsError, match="a proximal term .FedProx. needs backprop steps on the onnxruntime backend"):
        trainer.step(batch, 1e-3, proximal=(0.1, np.zeros(4, np.float32)))


def _short_examples(directory: Path) -> str:
    """A device whose batches hold few label tokens (prompt masked): weighting by tokens differs from by steps."""
    path = directory / "short.jsonl"
    lines = [json.dumps({"prompt": f"Q{i}: what follows {i}?", "completion": f" {i + 1}."}) for i in range(24)]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _clipped(update, start, norm):
    """Flower's fixed clipping: the update's distance to the global adapter scaled down to L2 norm <= `norm`."""
    delta = {n: update[n].astype(np.float64) - start[n] for n in start}
    scale = min(1.0, norm / np.sqrt(sum(float((d ** 2).sum()) for d in delta.values())))
    return {n: (start[n] + delta[n] * scale).astype(np.float32) for n in start}


def _expected_rounds(bundle_dir, files, rounds, steps, lr, saved, absent=None, clip=None):
    """The global adapter of each round recomputed outside Flower: every device's LocalClient from the saved global
    of the round before, then the token-weighted mean (float64). absent: round -> devices that sat it out; clip:
    each update clipped to that norm first (differential privacy's client side)."""
    clients = [_local(load_bundle(bundle_dir), data=f) for f in files]
    expected = {}
    for r in range(1, rounds + 1):
        start = saved[r - 1]
        results = [c.fit(start, steps, lr) for i, c in enumerate(clients) if i not in (absent or {}).get(r, ())]
        if clip:
            results = [(_clipped(t, start, clip), m) for t, m in results]
        tokens = [m["num-tokens"] for _, m in results]
        assert len(set(tokens)) > 1, tokens  # else a plain mean would pass too
        expected[r] = {n: (sum(np.float64(w) * t[n].astype(np.float64) for (t, _), w in zip(results, tokens))
                           / sum(tokens)).astype(np.float32) for n in start}
    return expected


def _saved_globals(out, bundle_dir, rounds):
    from lars_ort.federated.server_app import initial_adapter

    saved = {0: initial_adapter(load_bundle(bundle_dir))}
    for r in range(1, rounds + 1):
        saved[r] = read_checkpoint(out / "checkpoints" / f"step-{r:08d}" / "checkpoint").parameters
    return saved


def test_a_simulated_federation_averages_by_tokens_and_leaves_a_poisoned_update_out(tiny_bundles, tmp_path):
    """Three virtual devices on Flower's simulation engine, two rounds; device 2 sends NaN. The server rejects it
    with a log line, the global adapter of each round is the token-weighted mean of the two others (recomputed
    here), saved as a run that `lars-ort export-adapter` takes."""
    from flwr.app import ArrayRecord
    from flwr.clientapp import ClientApp
    from flwr.simulation import run_simulation

    from lars_ort.federated.client_app import numpy_to_arrays, train_reply
    from lars_ort.federated.server_app import ROUNDS_FILE, server_app

    bundle = tiny_bundles["llama"]
    files = [str(TRAIN_TEXT), _short_examples(tmp_path), str(TRAIN_TEXT)]
    out = tmp_path / "federated"
    config = {"bundle": str(bundle), "data": ",".join(files), "out": str(out), "rounds": 2, "local-steps": 2,
              "lr": 1e-2, "seq-len": SEQ, "min-clients": 3, "server-eval-data": str(EVAL_TEXT), "eval-batches": 2}

    def poisoned_client_app():
        app = ClientApp()

        @app.train()
        def train(msg, context):
            reply = train_reply(msg, context, config)
            if context.node_config["partition-id"] == 2:
                tensors = {n: a.numpy().copy() for n, a in reply.content["arrays"].items()}
                next(iter(tensors.values()))[0] = np.nan
                reply.content["arrays"] = numpy_to_arrays(tensors)
            assert isinstance(reply.content["arrays"], ArrayRecord)
            return reply

        return app

    run_simulation(server_app=server_app(config), client_app=poisoned_client_app(), num_supernodes=3,
                   backend_config={"client_resources": {"num_cpus": 1}})
    records = [json.loads(line) for line in (out / ROUNDS_FILE).read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2]
    for r in records[1:]:
        assert r["accepted"] == 2 and len(r["rejected"]) == 1 and r["failed"] == [], r
        assert np.isfinite(r["eval_loss"])
    saved = _saved_globals(out, bundle, 2)
    expected = _expected_rounds(bundle, files[:2], 2, 2, 1e-2, saved)
    for r in (1, 2):
        for name, value in expected[r].items():
            np.testing.assert_allclose(saved[r][name], value, rtol=0, atol=2e-7)
        assert any(not np.array_equal(saved[r][n], saved[r - 1][n]) for n in saved[r])
    # the global adapter as a PEFT adapter; the held-out loss the server logged is the bundle's eval of it
    adapter = tmp_path / "adapter"
    done = subprocess.run([sys.executable, "-m", "lars_ort.cli", "export-adapter", str(out), "--out", str(adapter)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    from safetensors.numpy import load_file

    exported = load_file(adapter / "adapter_model.safetensors")
    assert len(exported) == len(saved[2])
    assert sorted(np.abs(v).sum() for v in exported.values()) == pytest.approx(
        sorted(float(np.abs(v).sum()) for v in saved[2].values()), rel=1e-6)


def test_differential_privacy_clips_each_update_and_adds_noise_of_the_stated_scale(tiny_bundles, tmp_path):
    """dp-clipping-norm C and dp-noise-multiplier z: the global adapter is the token-weighted mean of the updates
    clipped to norm C (recomputed here) plus Gaussian noise of std z * C / min-clients (measured over the adapter)."""
    from flwr.simulation import run_simulation

    from lars_ort.federated.client_app import client_app
    from lars_ort.federated.server_app import server_app

    bundle = tiny_bundles["llama"]
    files = [str(TRAIN_TEXT), _short_examples(tmp_path)]
    out = tmp_path / "dp"
    clip, z = 0.01, 0.5
    config = {"bundle": str(bundle), "data": ",".join(files), "out": str(out), "rounds": 2, "local-steps": 2,
              "lr": 1e-2, "seq-len": SEQ, "min-clients": 2, "dp-clipping-norm": clip, "dp-noise-multiplier": z}
    run_simulation(server_app=server_app(config), client_app=client_app(config), num_supernodes=2,
                   backend_config={"client_resources": {"num_cpus": 1}})
    saved = _saved_globals(out, bundle, 2)
    unclipped = _expected_rounds(bundle, files, 1, 2, 1e-2, saved)[1]
    moved = np.sqrt(sum(float(((unclipped[n] - saved[0][n]).astype(np.float64) ** 2).sum()) for n in unclipped))
    assert moved > 3 * clip  # the updates are clipped for real
    expected = _expected_rounds(bundle, files, 2, 2, 1e-2, saved, clip=clip)
    for r in (1, 2):
        noise = np.concatenate([(saved[r][n].astype(np.float64) - expected[r][n]).ravel() for n in expected[r]])
        assert abs(noise.mean()) < 1e-4 and noise.std() == pytest.approx(z * clip / 2, rel=0.05), noise.std()


def test_secure_aggregation_gives_the_token_weighted_mean(tiny_bundles, tmp_path):
    """secagg = true: Flower's SecAgg+ workflow (the server unmasks only the sum of the quantized, weighted updates);
    the global adapter is the token-weighted mean recomputed here, to the protocol's quantization step."""
    from flwr.simulation import run_simulation

    from lars_ort.federated.client_app import client_app
    from lars_ort.federated.server_app import ROUNDS_FILE, server_app

    bundle = tiny_bundles["llama"]
    files = [str(TRAIN_TEXT), _short_examples(tmp_path), str(EVAL_TEXT)]
    out = tmp_path / "secagg"
    config = {"bundle": str(bundle), "data": ",".join(files), "out": str(out), "rounds": 2, "local-steps": 2,
              "lr": 1e-2, "seq-len": SEQ, "min-clients": 3, "secagg": True}
    run_simulation(server_app=server_app(config), client_app=client_app(config), num_supernodes=3,
                   backend_config={"client_resources": {"num_cpus": 1}})
    records = [json.loads(line) for line in (out / ROUNDS_FILE).read_text().splitlines()]
    assert [(r["round"], r.get("secagg"), r.get("accepted")) for r in records] == [(0, None, None), (1, True, 3),
                                                                                   (2, True, 3)]
    saved = _saved_globals(out, bundle, 2)
    expected = _expected_rounds(bundle, files, 2, 2, 1e-2, saved)
    for r in (1, 2):
        error = max(float(np.abs(saved[r][n] - expected[r][n]).max()) for n in expected[r])
        moved = max(float(np.abs(saved[r][n] - saved[r - 1][n]).max()) for n in expected[r])
        assert error < 2e-5 and moved > 100 * error, (error, moved)  # +-8 in 2^22 steps: 3.8e-6 a value


def test_the_demo_runs_a_tls_federation_on_loopback(tiny_bundles, tmp_path):
    """tools/federated_demo.py: a SuperLink and two SuperNodes as processes, TLS with the certificates it makes,
    node authentication (a third SuperNode with an unregistered key is refused); the global adapters equal the
    recomputed token-weighted means, and no Flower process outlives the demo."""
    bundle = tiny_bundles["llama"]
    files = [str(TRAIN_TEXT), _short_examples(tmp_path)]
    out = tmp_path / "fed"
    done = subprocess.run([sys.executable, str(REPO / "tools" / "federated_demo.py"), "--bundle", str(bundle),
                           "--clients", "2", "--rounds", "2", "--local-steps", "2", "--lr", "1e-2", "--seq-len",
                           str(SEQ), "--data", ",".join(files), "--eval-data", str(EVAL_TEXT), "--eval-batches", "2",
                           "--out", str(out), "--json", str(tmp_path / "rounds.json"), "--intruder"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "deployment engine, TLS, node authentication" in done.stdout
    # a SuperNode whose key was never registered is refused by node authentication and takes no part
    assert json.loads((tmp_path / "rounds.json").read_text())["intruder_refused"] is True
    lines = [line for line in done.stdout.splitlines() if line.startswith("round ")]
    assert len(lines) == 3 and all("2 clients averaged, 0 rejected, 0 failed" in line for line in lines[1:]), lines
    work = out.parent / f".{out.name}.flower"
    assert "Uvicorn running on https://127.0.0.1:" in (work / "superlink.log").read_text()
    assert (work / "certificates" / "ca.crt").is_file()
    rounds = json.loads((tmp_path / "rounds.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    saved = _saved_globals(out, bundle, 2)
    expected = _expected_rounds(bundle, files, 2, 2, 1e-2, saved)
    for r in (1, 2):
        for name, value in expected[r].items():
            np.testing.assert_allclose(saved[r][name], value, rtol=0, atol=2e-7)
    alive = subprocess.run(["pgrep", "-f", str(work)], capture_output=True, text=True)
    assert alive.stdout == "", alive.stdout


def test_a_killed_client_is_left_out_and_rejoins_where_its_data_stopped(tiny_bundles, tmp_path):
    """Three devices; device 2's SuperNode is SIGKILLed as round 2 starts and restarted 5 s later. Round 2 completes
    with the other two at the round timeout; round 3 takes the restarted device back, which continues its data
    after round 1 (its state file), not from the start: the global adapters match that recomputation."""
    bundle = tiny_bundles["llama"]
    files = [str(TRAIN_TEXT), _short_examples(tmp_path), str(TRAIN_TEXT)]
    out = tmp_path / "fed"
    done = subprocess.run([sys.executable, str(REPO / "tools" / "federated_demo.py"), "--bundle", str(bundle),
                           "--clients", "3", "--rounds", "3", "--local-steps", "2", "--lr", "1e-2", "--seq-len",
                           str(SEQ), "--data", ",".join(files), "--eval-data", str(EVAL_TEXT), "--eval-batches", "2",
                           "--out", str(out), "--min-clients", "2", "--round-timeout", "20", "--kill-client", "2",
                           "--kill-round", "2", "--json", str(tmp_path / "rounds.json"),
                           # a restarted node with the same key is admitted only after its old session expires (~1 min
                           # of Flower's heartbeat); without authentication it is a new node at once
                           "--no-node-auth"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    rounds = {r["round"]: r for r in json.loads((tmp_path / "rounds.json").read_text())["rounds"]}
    assert rounds[1]["accepted"] == 3
    assert rounds[2]["accepted"] == 2 and rounds[2]["no_reply"] + len(rounds[2]["failed"]) == 1, rounds[2]
    assert rounds[3]["accepted"] == 3, rounds[3]  # the restarted device (a new node id) is back
    state = json.loads((out.parent / f".{out.name}.flower" / "device-2" / "client_state.json").read_text())
    assert state["rounds"] == 2 and state["index"] == 4  # rounds 1 and 3, two batches each: resumed, not replayed
    saved = _saved_globals(out, bundle, 3)
    expected = _expected_rounds(bundle, files, 3, 2, 1e-2, saved, absent={2: [2]})
    for r in (1, 2, 3):
        for name, value in expected[r].items():
            np.testing.assert_allclose(saved[r][name], value, rtol=0, atol=2e-7)


def test_a_federation_where_every_device_fails_is_an_error_that_names_the_cause(tiny_bundles, tmp_path):
    missing = tmp_path / "nowhere.txt"
    done = subprocess.run([sys.executable, str(REPO / "tools" / "federated_demo.py"), "--bundle",
                           str(tiny_bundles["llama"]), "--clients", "2", "--rounds", "1", "--seq-len", str(SEQ),
                           "--data", f"{missing},{missing}", "--eval-data", str(EVAL_TEXT), "--eval-batches", "1",
                           "--out", str(tmp_path / "fed"), "--insecure"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "error: no round averaged a single device's update; the first failure: node " in done.stderr
    assert f"data file {missing} does not exist" in done.stderr


def test_a_device_round_imports_no_torch(tiny_bundles):
    """Flower and lars' apps on a device: no torch, transformers, optimum or peft imported, though installed here."""
    from base_install import FORBIDDEN

    script = f"""
import json, sys
import lars_ort.federated.client_app, lars_ort.federated.server_app
from lars_ort.federated.local import LocalClient, LocalData
client = LocalClient({str(tiny_bundles["qwen2"])!r}, LocalData(train={str(TRAIN_TEXT)!r}, seq_len=16))
tensors, metrics = client.fit(client.trainer.adapter_tensors(), steps=1, lr=1e-3)
print(json.dumps({{"tokens": metrics["num-tokens"], "imported": sorted(m for m in {FORBIDDEN!r} if m in sys.modules)}}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"tokens": 16, "imported": []}
