"""The README's embedding example is the file tools/embed_example.py, and it runs."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_readme_shows_the_embedding_example_verbatim():
    example = (REPO / "tools" / "embed_example.py").read_text()
    body = example[example.index("import sys"):]
    assert body.strip() in (REPO / "README.md").read_text()


def test_embedding_example_runs_and_lowers_the_loss(tiny_bundles, tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "embed_example.py"), str(tiny_bundles["llama"]),
                           str(tmp_path / "adapter")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    before, after = map(float, proc.stdout.split(":")[1].split("->"))
    assert after < before
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    assert "make test" in readme and "make demo" in readme
    assert "make test" in (REPO / ".ci" / "run").read_text()
