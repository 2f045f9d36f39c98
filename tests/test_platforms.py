"""The base install on the platforms the plain-onnxruntime runtime promises: Linux aarch64 and Python 3.13.

- Resolution for Linux aarch64 (Python 3.13 and 3.11): pip resolves the base dependencies, read from pyproject.toml,
  for a manylinux_2_28 aarch64 CPython as if on that machine (`--dry-run --report`: nothing is installed; pip's HTTP
  cache keeps the wheels it reads, so a second run does not fetch them again).
- Python 3.13 for real: a venv with python3.13 (built once into .venv-py313/, keyed on pyproject.toml's hash, like
  .venv-runtime/), `pip install -e .` without extras, and `lars-ort train --backend ort` on the tiny llama bundle.

Running a bundle on aarch64 itself (emulated) is tools/check_aarch64.sh, on demand: too slow for the suite.
"""

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from base_install import FORBIDDEN, REPO, base_install_python, env_of
from tiny import TRAIN_TEXT

PYTHON313 = Path(os.environ.get("LARS_PYTHON313", "/root/.pyenv/versions/3.13.0/bin/python3.13"))

# What pip on a glibc 2.28 aarch64 machine accepts: every manylinux_2_x up to 2.28 and the legacy manylinux2014 alias.
# pip does not expand a single `--platform manylinux_2_28_aarch64` to the older manylinux tags, and tokenizers and
# safetensors ship manylinux_2_17 (abi3) wheels only.
AARCH64_PLATFORMS = [f"manylinux_2_{minor}_aarch64" for minor in range(28, 16, -1)] + ["manylinux2014_aarch64"]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def base_dependencies() -> list[str]:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["dependencies"]


@pytest.mark.parametrize("python_version", ["3.13", "3.11"])
def test_base_install_resolves_for_linux_aarch64(python_version, tmp_path):
    abi = "cp" + python_version.replace(".", "")
    report = tmp_path / "report.json"
    platforms = [arg for plat in AARCH64_PLATFORMS for arg in ("--platform", plat)]
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--dry-run",
           "--ignore-installed", "--target", str(tmp_path / "target"), "--report", str(report),
           "--only-binary=:all:", *platforms, "--python-version", python_version, "--implementation", "cp",
           "--abi", abi, *base_dependencies()]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"pip could not resolve the base install for aarch64 / {abi}:\n{proc.stderr}"

    resolved = {_norm(item["metadata"]["name"]): item["download_info"]["url"].rsplit("/", 1)[-1]
                for item in json.loads(report.read_text())["install"]}
    wanted = {_norm(re.split(r"[\s<>=!~;\[(]", dep, maxsplit=1)[0]) for dep in base_dependencies()}
    assert wanted <= resolved.keys(), f"not resolved: {sorted(wanted - resolved.keys())}"

    wheel = resolved["onnxruntime"]
    assert wheel.endswith(".whl") and f"-{abi}-" in wheel and "aarch64" in wheel, wheel
    assert "onnxruntime-training" not in resolved and "onnxruntime-training-cpu" not in resolved, sorted(resolved)
    # Every binary wheel picked must run on aarch64 (pure-Python wheels are tagged `any`).
    for name, filename in resolved.items():
        assert filename.endswith(("-any.whl", "aarch64.whl")), f"{name}: {filename}"


@pytest.fixture(scope="session")
def py313_python():
    if not PYTHON313.exists():
        pytest.skip(f"python3.13 not found at {PYTHON313} (set LARS_PYTHON313 to another path)")
    return base_install_python(REPO / ".venv-py313", PYTHON313)


def test_python313_base_install_has_onnxruntime_and_no_torch(py313_python):
    probe = ("import importlib.util, json, sys, onnxruntime, lars_ort; print(json.dumps({'python': sys.version_info[:2],"
             " 'onnxruntime': onnxruntime.__version__, 'found': {m: importlib.util.find_spec(m) is not None"
             " for m in %r}}))")
    out = subprocess.run([str(py313_python), "-c", probe % (FORBIDDEN,)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["python"] == [3, 13]
    assert result["found"] == {m: False for m in FORBIDDEN}
    listed = subprocess.run([str(py313_python), "-m", "pip", "list", "--format=json", "--disable-pip-version-check"],
                            capture_output=True, text=True, check=True).stdout
    names = {_norm(p["name"]) for p in json.loads(listed)}
    assert "onnxruntime" in names and not any(n.startswith("onnxruntime-training") for n in names), sorted(names)


def test_lars_ort_trains_on_python313(py313_python, tiny_bundles, tmp_path):
    """The same run on Python 3.13's base install and on this environment's: the same losses, step by step."""
    args = ["train", str(tiny_bundles["llama"]), "--data", str(TRAIN_TEXT), "--steps", "3", "--batch-size", "2",
            "--seq-len", "32", "--lr", "3e-3", "--no-progress", "--backend", "ort"]
    losses = []
    for command, env, run in (([str(py313_python.parent / "lars-ort")], env_of(py313_python), tmp_path / "run313"),
                              ([sys.executable, "-m", "lars_ort.cli"], None, tmp_path / "run")):
        train = subprocess.run([*command, *args, "--out", str(run)], capture_output=True, text=True, env=env)
        assert train.returncode == 0, train.stderr
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        steps = [r for r in records if "loss" in r]
        assert [r["step"] for r in steps] == [1, 2, 3], records
        losses.append([r["loss"] for r in steps])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5), losses

