"""The child-process side of lars_export.ort_training: runs with onnxruntime-training first on sys.path.

Reads {"function", "args"} as JSON on stdin, prints {"result"} or {"error"} as the last line of stdout. Only the
functions below can be called; each takes and returns plain JSON values (paths as strings).
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path


def generate(forward_path: str, trainable: list[str], out_dir: str) -> None:
    """ORT's training artifacts (training / eval / optimizer models, checkpoint) of the forward graph at forward_path.

    Weight-less: the forward's external data (the frozen weights) is never loaded. Building the gradient graph needs
    the initializers' shapes, not their values, and ORT's training build copies the model several times on the way
    (7.7 GB peak for SmolLM2-135M's 0.5 GB of weights with them loaded). The artifacts keep the same references, so
    they belong beside the forward's data file (out_dir = forward_path's directory) when it has one."""
    import os

    import onnx

    from lars_export.training_graphs import generate_here

    model = onnx.load(forward_path, load_external_data=False)
    out_dir, cwd = str(Path(out_dir).resolve()), os.getcwd()
    os.chdir(Path(forward_path).parent)  # ORT resolves external data of a model given as bytes from the working dir
    try:
        generate_here(model, trainable, out_dir)
    finally:
        os.chdir(cwd)


def run_model(model_path: str, feeds_path: str, out_path: str) -> list[str]:
    """Run a model with the training build's InferenceSession (its com.microsoft training kernels included) on the
    arrays in feeds_path (.npz); write every output to out_path (.npz); return the output names."""
    import numpy as np
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)
    session = onnxruntime.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    outputs = session.run(names, dict(np.load(feeds_path)))
    np.savez(out_path, **dict(zip(names, outputs)))
    return names


def train_steps(directory: str, checkpoint: str | None, feeds_path: str, steps: int, lr: float, out_path: str,
                save_to: str | None = None, priority_order: bool = True, optimized_to: str | None = None) -> dict:
    """`steps` AdamW steps of ORT's own training artifacts in `directory` (training_model.onnx, optimizer_model.onnx;
    the checkpoint `checkpoint`, default directory/checkpoint) on one batch: feeds_path (.npz) holds the graph's
    user inputs by name, and optionally `param:<name>` arrays copied into the parameters before the first step.
    Writes out_path (.npz): `loss` [steps], `grad:<name>` of every step (`[steps, ...]`), `param:<name>` after the
    last step. Optionally saves the checkpoint (adapters + AdamW state) to save_to, and the graph ORT optimised and
    ran to optimized_to. Session settings as the runtime's (lars_artifacts.session_settings: arena on, buffer reuse
    off, priority order unless told otherwise, QDQ transformers and prepacking off).
    Returns the trainable names."""
    import numpy as np
    from onnxruntime.capi import _pybind_state as C

    from lars_artifacts import session_settings

    C.set_default_logger_severity(3)
    root = Path(directory)
    state = C.load_checkpoint(checkpoint or str(root / "checkpoint"))
    device = C.OrtDevice(C.OrtDevice.cpu(), C.OrtDevice.default_memory(), 0)
    options = session_settings.apply(C.SessionOptions(), C, priority_order=priority_order)  # as the runtime's
    if optimized_to:
        options.optimized_model_filepath = optimized_to
    module = C.Module(str(root / "training_model.onnx"), state, None, device, options)
    optimizer = C.Optimizer(str(root / "optimizer_model.onnx"), state, device, C.SessionOptions())
    data = dict(np.load(feeds_path))
    names = [n for n in state.parameter_names() if state.get_parameter(n).requires_grad]
    keep = []
    for key, value in data.items():
        if key.startswith("param:"):
            array = np.ascontiguousarray(value, dtype=np.float32)
            keep.append(array)
            state.copy_parameter_from(key[6:], C.OrtValue.ortvalue_from_numpy(array, device))
    inputs = [n for n in module.input_names(True) if n in data]
    losses, grads = [], {n: [] for n in names}
    for _ in range(steps):
        out = C.OrtValueVector()
        module.train_step([data[n] for n in inputs], out)
        losses.append(float(out[0].numpy()))
        for n in names:
            grads[n].append(state.get_parameter(n).grad.numpy().copy())
        optimizer.set_learning_rate(lr)
        optimizer.optimizer_step()
        module.lazy_reset_grad()
    result = {"loss": np.array(losses)}
    result.update({f"grad:{n}": np.stack(g) for n, g in grads.items() if g})
    result.update({f"param:{n}": state.get_parameter(n).data.numpy().copy() for n in names})
    np.savez(out_path, **result)
    if save_to:
        C.save_checkpoint(state, save_to, True)
    return names


def trainable_names(checkpoint: str) -> list[str]:
    from onnxruntime.capi import _pybind_state as C

    state = C.load_checkpoint(checkpoint)
    return [n for n in state.parameter_names() if state.get_parameter(n).requires_grad]


def version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def dump_checkpoint(checkpoint: str, out_path: str, directory: str | None = None,
                    resave_to: str | None = None) -> dict:
    """What ORT's own loader sees in `checkpoint`: writes every parameter's value to out_path (.npz, by name) and
    returns {"names", "requires_grad" (name -> bool), "properties" (name -> value)}. With `directory` (training
    artifacts), also builds the Module and AdamW Optimizer on the loaded state, as training does, and returns the
    optimizer's "learning_rate"; `resave_to` then saves the state (adapters + AdamW state as ORT holds them) there."""
    import numpy as np
    from onnxruntime.capi import _pybind_state as C

    C.set_default_logger_severity(3)
    state = C.load_checkpoint(checkpoint)
    names = list(state.parameter_names())
    np.savez(out_path, **{n: state.get_parameter(n).data.numpy().copy() for n in names})
    result = {"names": names, "requires_grad": {n: bool(state.get_parameter(n).requires_grad) for n in names},
              "properties": {n: state.get_property(n) for n in state.property_names()}}
    if directory:
        root = Path(directory)
        device = C.OrtDevice(C.OrtDevice.cpu(), C.OrtDevice.default_memory(), 0)
        module = C.Module(str(root / "training_model.onnx"), state, None, device, C.SessionOptions())
        optimizer = C.Optimizer(str(root / "optimizer_model.onnx"), state, device, C.SessionOptions())
        result["learning_rate"] = optimizer.get_learning_rate()
        if resave_to:
            C.save_checkpoint(state, resave_to, True)
        del module, optimizer
    return result


def batch(jobs: list) -> list:
    """Several of these functions in one child, in order: [[function, [args...]], ...] -> their results. Saves a
    start-up (importing the training build takes seconds) per call."""
    return [FUNCTIONS[function](*args) for function, args in jobs]


FUNCTIONS = {f.__name__: f for f in (generate, run_model, train_steps, trainable_names, version, dump_checkpoint,
                                     batch)}


def main() -> int:
    request = json.loads(sys.stdin.read())
    try:
        result = FUNCTIONS[request["function"]](*request["args"])
    except Exception as e:  # reported to the parent as one line; the traceback goes to stderr
        traceback.print_exc()
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(json.dumps({"error": first[:1000]}))
        return 0
    from lars_artifacts.measure import peak_rss_mb

    # this process' own high-water mark (the parent's getrusage(RUSAGE_CHILDREN) starts from its own RSS at the spawn)
    print(json.dumps({"result": result, "peak_rss_mb": peak_rss_mb()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
