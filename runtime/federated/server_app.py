"""The Flower ServerApp: FedAvg over the devices' LoRA adapters, weighted by the tokens each trained on.

Every reply is checked before it is averaged (aggregate.update_problem: tensor names, shapes, dtype, NaN/inf, the
weight); a bad one is logged with its node id and left out, never averaged in. The global adapter of every round
is written to the run directory `out` as a checkpoint of a `lars-ort train` run (atomically), so `lars-ort
export-adapter OUT` and `lars-ort eval BUNDLE --run OUT` take it as they take a local run; `out/federation.jsonl`
has one line per round (held-out loss of the global adapter, clients accepted / rejected / failed, tokens, bytes,
seconds). FedProx is the option `proximal-mu` > 0 (the devices add mu * (w - w_global) to their gradients);
differential privacy the options dp-clipping-norm / dp-noise-multiplier (Flower's client-side fixed clipping).
"""

from __future__ import annotations

import json
import math
import time
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
from flwr.app import Context, MetricRecord, RecordDict
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.logger import log
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg

from lars_artifacts import CHECKPOINT, Bundle, LarsError, load_bundle
from lars_artifacts.ort_checkpoint import OrtCheckpoint, read_checkpoint, write_checkpoint

from .. import checkpoint as ckpt
from ..data import eval_batches, load_sequences
from ..trainer import Trainer
from .aggregate import update_problem, weighted_mean
from .client_app import CLIENT_DEFAULTS, arrays_to_numpy, numpy_to_arrays

# The run config (`[tool.flwr.app.config]` of the Flower App, `flwr run --run-config "key=value ..."`): the server's
# keys below, the devices' in client_app.CLIENT_DEFAULTS (bundle, data, eval-data, batch-size, seq-len, ...).
SERVER_DEFAULTS = {
    "out": "",                  # run directory for the global adapters (new, or pass another)
    "rounds": 3,
    "min-clients": 2,           # a round starts when this many devices are connected and needs no more replies
    "fraction-train": 1.0,      # of the connected devices, sampled each round
    "fraction-evaluate": 0.0,   # > 0: devices also score the global adapter on their own eval-data
    "round-timeout": 600.0,     # seconds to wait for replies; a device that does not answer is left out
    "proximal-mu": 0.0,         # FedProx; 0 is FedAvg
    "server-eval-data": "",     # the server's held-out file: the global adapter's loss after every round
    # Differential privacy (Flower's central DP with client-side clipping): each device clips its update to this
    # L2 norm, the server adds Gaussian noise of std noise-multiplier * clipping-norm / min-clients to the mean
    "dp-clipping-norm": 0.0,    # 0: off
    "dp-noise-multiplier": 0.0,
    # Secure aggregation (Flower's SecAgg+ workflow): the server learns only the weighted sum of the updates, so
    # it cannot check them one by one; each value is clipped to +-8 and quantized (steps of ~4e-6) on the device
    "secagg": False,
}
ROUNDS_FILE = "federation.jsonl"


def reply_problem(content: RecordDict, reference: dict[str, np.ndarray]) -> str | None:
    """Why a device's train reply cannot be averaged (None when it can)."""
    arrays, metrics = content.array_records, content.metric_records
    if list(arrays) != ["arrays"] or list(metrics) != ["metrics"]:
        return (f"the reply holds array records {sorted(arrays)} and metric records {sorted(metrics)}, not one "
                f"'arrays' and one 'metrics'")
    values = metrics["metrics"]
    for key, value in values.items():
        if not all(math.isfinite(v) for v in (value if isinstance(value, list) else [value])):
            return f"its metric {key} is {value!r}"
    return update_problem(reference, arrays_to_numpy(arrays["arrays"]), values.get("num-tokens"))


def round_outcome(sampled: int, accepted: int, rejected: list, failed: list[str], no_reply: int, train_tokens: int,
                  clients: list[dict], **extra) -> dict:
    """A round's line in federation.jsonl (before the server adds its time, loss and checkpoint): how many devices
    were sampled, whose updates were averaged, rejected (node ids) or failed (with the reason), how many said
    nothing within the round timeout, the tokens trained and each device's own figures."""
    return {"sampled": sampled, "accepted": accepted, "rejected": rejected, "failed": failed, "no_reply": no_reply,
            "train_tokens": train_tokens, "clients": clients, **extra}


class AdapterFedAvg(FedAvg):
    """FedAvg over adapters that checks every reply first (and sends FedProx's mu when set)."""

    def __init__(self, reference: dict[str, np.ndarray], proximal_mu: float = 0.0, **kwargs) -> None:
        super().__init__(weighted_by_key="num-tokens", **kwargs)
        self.reference, self.proximal_mu = reference, float(proximal_mu)
        self.outcome: dict[int, dict] = {}  # round -> sampled, accepted / rejected / failed nodes, no reply, tokens
        self.sampled: dict[int, int] = {}

    def configure_train(self, server_round, arrays, config, grid):
        if self.proximal_mu:
            config["proximal-mu"] = self.proximal_mu
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.sampled[server_round] = len(messages)
        return messages

    def aggregate_train(self, server_round, replies):
        accepted, rejected, failed, clients = [], [], [], []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                failed.append(f"node {node}: {msg.error.reason}"[:500])
                log(WARNING, "round %d: node %d failed: %s", server_round, node, msg.error.reason)
                continue
            problem = reply_problem(msg.content, self.reference)
            if problem:
                rejected.append(node)
                log(WARNING, "round %d: rejected the update of node %d: %s", server_round, node, problem)
                continue
            accepted.append(msg.content)
            clients.append({"node": node, **dict(msg.content["metrics"])})  # the device's own figures
        tokens = [int(c["metrics"]["num-tokens"]) for c in accepted]
        sampled = self.sampled.get(server_round, 0)
        silent = max(sampled - len(accepted) - len(rejected) - len(failed), 0)  # no reply within round-timeout
        if silent:
            log(WARNING, "round %d: %d of %d sampled nodes did not reply within the round timeout", server_round,
                silent, sampled)
        self.outcome[server_round] = round_outcome(sampled, len(accepted), rejected, failed, silent, sum(tokens),
                                                   clients)
        if not accepted:
            log(WARNING, "round %d: no update accepted; the global adapter stays as it was", server_round)
            return None, None
        mean = weighted_mean([arrays_to_numpy(c["arrays"]) for c in accepted], tokens)
        return numpy_to_arrays(mean), self.train_metrics_aggr_fn(accepted, self.weighted_by_key)


class SecAggFedAvg(LegacyFedAvg):
    """FedAvg under SecAgg+: the workflow hands it the unmasked weighted mean (in every result's place); it checks
    that mean (shapes, NaN/inf) since the single updates are never seen, and keeps the round's figures."""

    def __init__(self, reference: dict[str, np.ndarray], **kwargs) -> None:
        super().__init__(**kwargs)
        self.reference = reference
        self.outcome: dict[int, dict] = {}

    def aggregate_fit(self, server_round, results, failures):
        parameters, metrics = super().aggregate_fit(server_round, results, failures)
        self.outcome[server_round] = round_outcome(
            len(results) + len(failures), len(results), [], [str(f) for f in failures], 0,
            sum(int(res.num_examples) for _, res in results), [dict(res.metrics) for _, res in results], secagg=True)
        if parameters is None:
            return None, metrics
        # dequantized in float64; the adapter is float32 (the shape check still sees a wrong shape)
        mean = {name: value.astype(self.reference[name].dtype) for name, value
                in zip(self.reference, parameters_to_ndarrays(parameters))}
        problem = update_problem(self.reference, mean, 1)
        if problem:
            log(WARNING, "round %d: the securely aggregated adapter is unusable (%s); the global adapter stays",
                server_round, problem)
            self.outcome[server_round]["rejected"] = ["the aggregate"]
            return None, metrics
        return ndarrays_to_parameters(list(mean.values())), metrics


class GlobalAdapter:
    """The global adapter as checkpoint.save takes an engine's: its tensors, written as an ORT checkpoint."""

    def __init__(self, tensors: dict[str, np.ndarray]) -> None:
        self.tensors = tensors

    def adapter_tensors(self) -> dict[str, np.ndarray]:
        return self.tensors

    def save(self, path) -> None:
        write_checkpoint(str(path), OrtCheckpoint(parameters=self.tensors,
                                                  requires_grad={n: True for n in self.tensors}))


def initial_adapter(bundle: Bundle) -> dict[str, np.ndarray]:
    """The bundle's initial adapter tensors (its checkpoint, read without onnxruntime)."""
    step = bundle.manifest.ort_step
    saved = read_checkpoint(bundle.file(step.checkpoint if step else CHECKPOINT)).parameters
    return {p.onnx_name: saved[p.onnx_name] for p in bundle.manifest.adapter_parameters}


def run_federation(grid: Grid, settings: dict, context: Context | None = None) -> dict:
    """Run `rounds` rounds of FedAvg on `grid`; returns the last round's record."""
    if not settings["bundle"]:
        raise LarsError("the run config names no bundle; pass --run-config \"bundle='PATH'\"")
    if not settings["out"]:
        raise LarsError("the run config names no out directory for the global adapters; pass --run-config "
                        "\"out='DIR'\"")
    bundle = load_bundle(settings["bundle"])
    reference = initial_adapter(bundle)
    out = Path(settings["out"])
    ckpt.create_run(out, bundle, {k: settings[k] for k in sorted(settings)}, "")
    rounds, started = int(settings["rounds"]), time.monotonic()
    held, evaluator = None, None
    if settings["server-eval-data"]:
        evaluator = Trainer(bundle, load_eval=True, training=False, threads=int(settings["threads"]))
        held = load_sequences(settings["server-eval-data"], evaluator.tokenizer, int(settings["seq-len"]))
    strategy = AdapterFedAvg(reference, settings["proximal-mu"], fraction_train=float(settings["fraction-train"]),
                             fraction_evaluate=float(settings["fraction-evaluate"]),
                             min_train_nodes=int(settings["min-clients"]),
                             min_evaluate_nodes=int(settings["min-clients"]),
                             min_available_nodes=int(settings["min-clients"]))
    runner, secagg = strategy, None
    if settings["secagg"]:
        if float(settings["dp-clipping-norm"]) or float(settings["proximal-mu"]):
            raise LarsError("secagg runs Flower's SecAgg+ workflow, which takes neither dp-clipping-norm nor "
                            "proximal-mu; set those to 0 or secagg to false")
        if context is None:
            raise LarsError("secagg needs the ServerApp's Context (run_federation(grid, settings, context))")
        secagg = SecAggFedAvg(reference, fraction_fit=float(settings["fraction-train"]), fraction_evaluate=0.0,
                              min_fit_clients=int(settings["min-clients"]),
                              min_available_clients=int(settings["min-clients"]),
                              initial_parameters=ndarrays_to_parameters(list(reference.values())))
    clip, noise = float(settings["dp-clipping-norm"]), float(settings["dp-noise-multiplier"])
    if noise and not clip > 0:
        raise LarsError(f"dp-noise-multiplier {noise} needs a dp-clipping-norm > 0 (the noise is scaled by it)")
    if clip:
        runner = DifferentialPrivacyClientSideFixedClipping(strategy, noise, clip,
                                                            num_sampled_clients=int(settings["min-clients"]))
    adapter_bytes = sum(t.nbytes for t in reference.values())
    record: dict = {}

    def after_round(server_round: int, tensors: dict[str, np.ndarray]) -> dict:
        nonlocal started, record
        outcome = (secagg or strategy).outcome
        record = {"round": server_round, "seconds": round(time.monotonic() - started, 3),
                  **outcome.get(server_round, {}), "adapter_bytes": adapter_bytes}
        if server_round:
            state = {"step": server_round, "position": {"epoch": 0, "index": 0, "seed": 0}, "federated": record}
            record["checkpoint"] = str(ckpt.save(out, GlobalAdapter(tensors), state, keep=max(2, rounds)))
        if evaluator is not None:
            evaluator.engine.set_adapter_tensors(tensors)
            score = evaluator.evaluate(eval_batches(held, int(settings["batch-size"]), evaluator.tokenizer.pad_id,
                                                    int(settings["eval-batches"])))
            record["eval_loss"] = score["eval_loss"]
        with open(out / ROUNDS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
        log(INFO, "lars round %d/%d: global held-out loss %s, %s clients accepted, %d rejected, %d failed, "
            "%s no reply, %s train tokens, %.1f s", server_round, rounds,
            f"{record['eval_loss']:.4f}" if "eval_loss" in record else "-", record.get("accepted", "-"),
            len(record.get("rejected", [])), len(record.get("failed", [])), record.get("no_reply", "-"),
            record.get("train_tokens", "-"), record["seconds"])
        started = time.monotonic()
        return record

    if secagg:
        secagg.evaluate_fn = lambda r, arrays, config: _loss_of(after_round(r, dict(zip(reference, arrays))))
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=rounds,
                                                                    round_timeout=float(settings["round-timeout"])),
                               strategy=secagg)
        # Every sampled device holds a share of every other's key; any 2/3 of them can unmask a dropped device
        max_tokens = int(settings["local-steps"]) * int(settings["batch-size"]) * int(settings["seq-len"])
        DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=2 / 3,
                                                        max_weight=max_tokens,
                                                        timeout=float(settings["round-timeout"])))(grid, legacy)
        return record
    runner.start(grid=grid, initial_arrays=numpy_to_arrays(reference), num_rounds=rounds,
                 timeout=float(settings["round-timeout"]),
                 evaluate_fn=lambda r, arrays: _metrics_of(after_round(r, arrays_to_numpy(arrays))))
    return record


def _metrics_of(record: dict) -> MetricRecord | None:
    return MetricRecord({"eval_loss": record["eval_loss"]}) if "eval_loss" in record else None


def _loss_of(record: dict) -> tuple[float, dict] | None:
    return (record["eval_loss"], {}) if "eval_loss" in record else None


def server_app(defaults: dict | None = None) -> ServerApp:
    """A ServerApp whose run-config defaults are `defaults` (as client_app.client_app)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, {**CLIENT_DEFAULTS, **SERVER_DEFAULTS, **(defaults or {}), **dict(context.run_config)},
                       context)

    return app


app = server_app()
