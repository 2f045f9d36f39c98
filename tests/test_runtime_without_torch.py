"""The runtime in an environment with the base install only: plain onnxruntime, no onnxruntime-training, and no torch,
transformers or optimum installed.

The environment is built once (from this repo, `pip install -e .` without extras) into .venv-runtime/ and reused;
`make test` builds it before pytest runs.
"""

import json
import subprocess
import sys

import pytest

from base_install import FORBIDDEN, REPO, base_install_python, env_of
from tiny import EVAL_TEXT, TRAIN_TEXT


@pytest.fixture(scope="session")
def runtime_python():
    return base_install_python(REPO / ".venv-runtime", sys.executable)


def test_base_install_has_no_torch_and_plain_onnxruntime(runtime_python):
    probe = "import importlib.util, json; print(json.dumps({m: importlib.util.find_spec(m) is not None for m in %r}))"
    out = subprocess.run([str(runtime_python), "-c", probe % (FORBIDDEN,)], capture_output=True, text=True,
                         check=True).stdout
    assert json.loads(out) == {m: False for m in FORBIDDEN}
    # The runtime's onnxruntime is the plain one: no training build installed, no training API in it.
    probe = ("import importlib.metadata as m, importlib.util as u, json, onnxruntime; "
             "print(json.dumps([onnxruntime.__version__, u.find_spec('onnxruntime.training') is not None, "
             "sorted(d.metadata['Name'] for d in m.distributions() if 'onnxruntime' in d.metadata['Name'])]))")
    version, has_training, dists = json.loads(subprocess.run([str(runtime_python), "-c", probe], capture_output=True,
                                                             text=True, check=True).stdout)
    assert dists == ["onnxruntime"] and not has_training and tuple(map(int, version.split(".")[:2])) >= (1, 31)


def test_lars_ort_trains_evaluates_and_exports_without_torch(runtime_python, tiny_bundles, tmp_path):
    bindir, env = runtime_python.parent, env_of(runtime_python)
    run = tmp_path / "run"
    train = subprocess.run([str(bindir / "lars-ort"), "train", str(tiny_bundles["qwen2"]), "--data", str(TRAIN_TEXT),
                            "--eval-data", str(EVAL_TEXT), "--out", str(run), "--steps", "4", "--batch-size", "2",
                            "--seq-len", "32", "--lr", "3e-3", "--no-progress"],
                           capture_output=True, text=True, env=env)
    assert train.returncode == 0, train.stderr
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if "loss" in r] == [1, 2, 3, 4] and (run / "latest").is_file()
    export = subprocess.run([str(bindir / "lars-ort"), "export-adapter", str(run), "--out", str(tmp_path / "ad")],
                            capture_output=True, text=True, env=env)
    assert export.returncode == 0, export.stderr
    assert (tmp_path / "ad" / "adapter_model.safetensors").stat().st_size > 0

    # The library path an app embeds: a step on text, with torch and friends never imported.
    script = f"""
import sys, json
from lars_ort import Trainer
t = Trainer({str(tiny_bundles["qwen2"])!r}, load_eval=False)
loss = t.step_text(["To be, or not to be, that is the question"], lr=1e-3)
print(json.dumps({{"loss": loss, "imported": sorted(m for m in {FORBIDDEN!r} if m in sys.modules)}}))
"""
    out = subprocess.run([str(runtime_python), "-c", script], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # the same step in this (torch-present) environment gives the same loss
    from lars_ort import Trainer

    expected = Trainer(tiny_bundles["qwen2"], load_eval=False).step_text(["To be, or not to be, that is the question"],
                                                                     lr=1e-3)
    assert result["imported"] == [] and result["loss"] == pytest.approx(expected, rel=1e-5)


def test_forward_only_training_without_torch(runtime_python, tiny_bundles, tmp_path):
    """--method zo in the base install: the forward graph only (no training session), adapters that moved."""
    env = env_of(runtime_python)
    script = f"""
import sys, json
import numpy as np
from lars_ort import Trainer
from lars_ort.zo import ZoConfig
t = Trainer({str(tiny_bundles["llama"])!r}, load_eval=False, method="zo", zo=ZoConfig(perturbations=2, parallel=4))
before = t.adapter_tensors()
loss = t.step_text(["To be, or not to be, that is the question"], lr=1e-2)
moved = sorted(n for n, v in t.adapter_tensors().items() if not np.array_equal(v, before[n]))
print(json.dumps({{"loss": loss, "moved": moved, "training_session": t.engine.base.session is not None,
                  "imported": sorted(m for m in {FORBIDDEN!r} if m in sys.modules)}}))
"""
    out = subprocess.run([str(runtime_python), "-c", script], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["imported"] == [] and not result["training_session"] and result["loss"] > 0
    assert result["moved"] and all(".lora_B." in n for n in result["moved"])


def test_data_flows_one_way_exptraining_graphs_runtime():
    """The exporter imports the bundle contract, never the runtime; the contract imports neither half (read from the
    source: an import inside a function counts too)."""
    import ast

    def imported(folder):
        names = set()
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names |= {(a.name.split(".")[0], path.name) for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    names.add((node.module.split(".")[0], path.name))
        return names

    assert [n for n in imported("export") if n[0] == "lars_ort"] == []
    assert [n for n in imported("artifacts") if n[0] in ("lars_ort", "lars_export")] == []
    assert ("lars_artifacts", "pipeline.py") in imported("export")  # the check reads what it should
