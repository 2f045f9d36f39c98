"""onnxruntime-training 1.19.2, kept in a directory of its own and used from child processes.

Why: the exporter needs ORT's training build to build the gradient graph (`generate_artifacts`), but the training
build and plain `onnxruntime` (what the runtime, and so the base install, depends on) install the same top-level
package `onnxruntime`: they cannot share an environment. So the training build is installed with
`pip install --target HOME --no-deps` into its own directory, and only child processes put HOME first on their
`sys.path`. The child takes everything else (torch, which `onnxruntime.training` imports; onnx; numpy) from this
environment. When ORT's training build is no longer needed (our own gradient builder), this module can go.

    python -m lars_export.ort_training install    # what `make` runs; lars-export also installs it on first use
    python -m lars_export.ort_training home       # prints HOME (e.g. for PYTHONPATH=HOME lars-ort --backend ...)
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from lars_artifacts import LarsError

VERSION = "1.19.2"
PACKAGE = f"onnxruntime-training-cpu=={VERSION}"
HOME_ENV = "LARS_ORT_TRAINING_HOME"


def home() -> Path:
    """Where the training build lives: $LARS_ORT_TRAINING_HOME, else inside this environment (sys.prefix), so it is
    removed with the environment."""
    if os.environ.get(HOME_ENV):
        return Path(os.environ[HOME_ENV])
    return Path(sys.prefix) / "lib" / f"lars-onnxruntime-training-{VERSION}"


def installed(where: Path | None = None) -> bool:
    where = where or home()
    return (where / "onnxruntime" / "training" / "__init__.py").is_file()


def ensure(stream=None) -> Path:
    """The training build's directory, installed there from the package registry if it is not yet (reported to
    `stream`, sys.stderr as it is when called)."""
    stream = stream or sys.stderr
    where = home()
    if installed(where):
        return where
    if sys.platform == "linux" and platform.machine() not in ("x86_64", "AMD64"):
        raise LarsError(f"{PACKAGE} has no wheel for this platform (Linux {platform.machine()}); "
                        f"export on an x86-64 machine and copy the bundle to this device")
    print(f"installing {PACKAGE} into {where} (once; the exporter's gradient builder) ...", file=stream, flush=True)
    result = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(where),
                             PACKAGE], capture_output=True, text=True)
    if result.returncode != 0 or not installed(where):
        tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise LarsError(f"could not install {PACKAGE} into {where} ({tail[:300]}); install it there yourself with "
                        f"`pip install --no-deps --target {where} {PACKAGE}` or set {HOME_ENV}")
    return where


def child_env() -> dict[str, str]:
    """Environment of a child process whose `import onnxruntime` is the training build."""
    where = ensure()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(where), *filter(None, [env.get("PYTHONPATH")])])
    return env


child_peak_rss_mb = 0.0  # the largest peak RSS a child of `call` reported so far (the export's phases print it)


def call(function: str, *args, timeout: float | None = None) -> object:
    """Run `lars_export._ort_training_worker.<function>(*args)` in a child with the training build; return what it
    returns (JSON). A failure in the child is raised here as a one-line LarsError."""
    request = json.dumps({"function": function, "args": [str(a) if isinstance(a, Path) else a for a in args]})
    result = subprocess.run([sys.executable, "-m", "lars_export._ort_training_worker"], input=request,
                            capture_output=True, text=True, env=child_env(), timeout=timeout)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        errors = [line for line in result.stderr.strip().splitlines() if line.strip()]
        raise LarsError(f"onnxruntime-training ({function}) failed: {(errors or ['no output'])[-1][:400]}")
    reply = json.loads(lines[-1])
    global child_peak_rss_mb
    child_peak_rss_mb = max(child_peak_rss_mb, reply.get("peak_rss_mb", 0.0))
    if "error" in reply:
        raise LarsError(reply["error"])
    return reply["result"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv == ["install"]:
            print(ensure())
        elif argv == ["home"]:
            print(home())
        else:
            print("usage: python -m lars_export.ort_training install|home", file=sys.stderr)
            return 2
    except LarsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
