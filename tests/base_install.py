"""Environments with the base install only (the runtime: plain onnxruntime, numpy, tokenizers; no torch), built from
this repository with `pip install -e .` and no extras, once per pyproject.toml (a stamp holds its hash)."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FORBIDDEN = ("torch", "transformers", "optimum", "peft")  # never installed, never imported by the runtime


def base_install_python(venv: Path, interpreter: str | os.PathLike) -> Path:
    """The python of `venv`, (re)built with `interpreter` unless it is up to date with pyproject.toml."""
    python, stamp = venv / "bin" / "python", venv / ".lars-stamp"
    expected = hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest()
    if not (python.exists() and stamp.exists() and stamp.read_text() == expected):
        clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # another Python's modules break venv
        subprocess.run([str(interpreter), "-m", "venv", "--clear", str(venv)], check=True, env=clean)
        # env_of: no PYTHONPATH, or pip would count what it finds there as installed and skip it
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-e", str(REPO)],
                       check=True, env=env_of(python))
        stamp.write_text(expected)
    return python


def env_of(python: Path) -> dict[str, str]:
    """The environment of a command run from that venv: its bin first on PATH, nothing from ours on PYTHONPATH."""
    env = {**os.environ, "PATH": f"{python.parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    return env
