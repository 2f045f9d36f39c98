"""The child-process side of lars_export.ort_training: runs with onnxruntime-training first on sys.path.

Reads {"function", "args"} as JSON on stdin, prints {"result"} or {"error"} as the last line of stdout. Only the
functions below can be called; each takes and returns plain JSON values (paths as strings).
"""

from __future__ import annotations

import json
import sys
import traceback


def generate(forward_path: str, trainable: list[str], out_dir: str) -> None:
    """ORT's training artifacts (training / eval / optimizer models, checkpoint) of the forward graph at forward_path."""
    import onnx

    from lars_export.ort_artifacts import generate_here

    generate_here(onnx.load(forward_path), trainable, out_dir)


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


def trainable_names(checkpoint: str) -> list[str]:
    from onnxruntime.capi import _pybind_state as C

    state = C.load_checkpoint(checkpoint)
    return [n for n in state.parameter_names() if state.get_parameter(n).requires_grad]


def version() -> str:
    import onnxruntime

    return onnxruntime.__version__


FUNCTIONS = {f.__name__: f for f in (generate, run_model, trainable_names, version)}


def main() -> int:
    request = json.loads(sys.stdin.read())
    try:
        result = FUNCTIONS[request["function"]](*request["args"])
    except Exception as e:  # reported to the parent as one line; the traceback goes to stderr
        traceback.print_exc()
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(json.dumps({"error": first[:1000]}))
        return 0
    print(json.dumps({"result": result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
