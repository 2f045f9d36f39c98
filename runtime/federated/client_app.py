"""The Flower ClientApp: a device's federated rounds on `lars_ort` (no torch).

A train message carries the global adapter (ArrayRecord "arrays") and the round's settings (ConfigRecord "config":
local-steps, lr, proximal-mu); the reply carries the adapter after local training and a MetricRecord "metrics"
with num-tokens (the FedAvg weight), num-examples, train_loss and the device's peak RSS. An evaluate message
is answered with the loss on the device's held-out file.

Where the device's files are: the SuperNode's `--node-config` (data, eval-data, state-dir) when given; otherwise,
in Flower's simulation engine, the run config's comma-separated `data` / `eval-data` lists, entry `partition-id`.
The bundle and the batch shape come from the run config (`flwr run --run-config`), the same on every device.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import flwr.compat.common.recorddict_compat as compat
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from lars_artifacts import LarsError

from .local import LocalClient, LocalData

# Run-config keys the ClientApp reads, with their defaults (server_app.RUN_CONFIG documents the whole set).
CLIENT_DEFAULTS = {"bundle": "", "data": "", "eval-data": "", "state-dir": "", "batch-size": 1, "seq-len": 256,
                   "seed": 0, "threads": 0, "local-steps": 10, "lr": 2e-4, "eval-batches": 0}

LEGACY_FIT = "fitins.parameters"  # the array record of Flower's FitIns, as the SecAgg+ workflow sends it
POSITION = "lars-data-position"  # the node context's record of where its data stream stands
_clients: dict[tuple, LocalClient] = {}  # one per device setting in this process (simulation workers reuse theirs)


def arrays_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


def numpy_to_arrays(tensors: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in tensors.items()})


def _pick(value: str, partition, what: str) -> str:
    """Entry `partition` of a comma-separated list (one entry: every device's)."""
    entries = [v.strip() for v in str(value).split(",") if v.strip()]
    if len(entries) <= 1 or partition is None:
        return entries[0] if entries else ""
    if not 0 <= int(partition) < len(entries):
        raise LarsError(f"run config {what} lists {len(entries)} files but this device is partition {partition}; "
                        f"give one file per partition")
    return entries[int(partition)]


def device_settings(context: Context, defaults: dict | None = None) -> dict:
    """The settings of this device: CLIENT_DEFAULTS < `defaults` < run config < node config."""
    settings = {**CLIENT_DEFAULTS, **(defaults or {}), **dict(context.run_config)}
    node = dict(context.node_config)
    partition = node.get("partition-id")
    for key in ("data", "eval-data", "state-dir"):
        settings[key] = str(node[key]) if key in node else _pick(settings[key], partition, key)
    if not settings["bundle"]:
        raise LarsError("the run config names no bundle; pass --run-config \"bundle='PATH'\" (a lars-export "
                        "bundle present on every device)")
    if not settings["data"]:
        raise LarsError("this device has no training data; start its SuperNode with --node-config "
                        "\"data='FILE'\" (or list one file per partition in the run config's data)")
    return settings


def local_client(settings: dict) -> LocalClient:
    data = LocalData(train=settings["data"], eval=settings["eval-data"] or None,
                     batch_size=int(settings["batch-size"]), seq_len=int(settings["seq-len"]),
                     seed=int(settings["seed"]), eval_batches=int(settings["eval-batches"]))
    state = Path(settings["state-dir"]) / "client_state.json" if settings["state-dir"] else None
    key = (str(Path(settings["bundle"]).resolve()), repr(data), str(state), int(settings["threads"]))
    if key not in _clients:
        _clients.clear()  # one device per process: never two bundles' sessions at once
        _clients[key] = LocalClient(settings["bundle"], data, state, threads=int(settings["threads"]))
    return _clients[key]


def _fit(context: Context, settings: dict, tensors, config) -> tuple[dict, dict, LocalClient]:
    steps = int(config.get("local-steps", settings["local-steps"]))
    lr = float(config.get("lr", settings["lr"]))
    mu = float(config.get("proximal-mu", 0.0))
    client = local_client(settings)
    if POSITION in context.state:  # this node's last round, also when another device ran in this process since
        client.set_position(dict(context.state[POSITION]))
    else:  # this node's first round here: its state file's position, never another node's (same files, same key)
        client.restore_position()
    if not isinstance(tensors, dict):  # SecAgg+'s list, in the bundle's adapter order (the server's too)
        names = client.trainer.engine.adapter_names
        if len(tensors) != len(names):
            raise LarsError(f"the global adapter has {len(tensors)} tensors, bundle {client.bundle.path} "
                            f"{len(names)}; every device must train the bundle the server started from")
        tensors = dict(zip(names, tensors))
    trained, metrics = client.fit(tensors, steps, lr, mu)
    context.state[POSITION] = ConfigRecord(client.position())
    return trained, metrics, client


def train_reply(msg: Message, context: Context, defaults: dict | None = None) -> Message:
    settings = device_settings(context, defaults)
    if LEGACY_FIT in msg.content.array_records:  # the SecAgg+ workflow speaks Flower's FitIns / FitRes records
        fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
        tensors, metrics, client = _fit(context, settings, parameters_to_ndarrays(fitins.parameters), fitins.config)
        weights = ndarrays_to_parameters([tensors[n] for n in client.trainer.engine.adapter_names])
        fitres = FitRes(Status(Code.OK, "trained"), weights, metrics["num-tokens"], metrics)
        return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)
    tensors, metrics, _ = _fit(context, settings, arrays_to_numpy(msg.content["arrays"]),
                               msg.content.get("config", {}))
    return Message(RecordDict({"arrays": numpy_to_arrays(tensors), "metrics": MetricRecord(metrics)}), reply_to=msg)


def evaluate_reply(msg: Message, context: Context, defaults: dict | None = None) -> Message:
    result = local_client(device_settings(context, defaults)).evaluate(arrays_to_numpy(msg.content["arrays"]))
    return Message(RecordDict({"metrics": MetricRecord(result)}), reply_to=msg)


def clipping_when_asked(msg: Message, context: Context, call_next) -> Message:
    """Differential privacy's client side: Flower's fixed clipping of the update (adapter - global adapter) to the
    norm the server's round config names (server_app: dp-clipping-norm > 0); a pass-through otherwise."""
    if msg.metadata.message_type == MessageType.TRAIN and any(KEY_CLIPPING_NORM in c for c in
                                                              msg.content.config_records.values()):
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


def secagg_when_asked(msg: Message, context: Context, call_next) -> Message:
    """Secure aggregation's device side: Flower's SecAgg+ mod (key shares with the other devices, the weighted update
    quantized and masked so that the server learns only the sum) when the server runs the SecAgg+ workflow
    (server_app: secagg = true); a pass-through otherwise."""
    if msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def client_app(defaults: dict | None = None) -> ClientApp:
    """A ClientApp whose run-config defaults are `defaults` (tests and the simulation engine, which takes no run
    config, pass the bundle and data here)."""
    app = ClientApp(mods=[secagg_when_asked, clipping_when_asked])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return train_reply(msg, context, defaults)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return evaluate_reply(msg, context, defaults)

    return app


app = client_app()
