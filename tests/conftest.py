import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import build_model  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {arch: build_model(arch, root / arch) for arch in ("llama", "qwen2", "llama3", "gemma3")}


@pytest.fixture(scope="session")
def tiny_bundles(tiny_models, tmp_path_factory):
    """Exact LoRA bundles (--lars-basis none) of the tiny models."""
    from lars_export import ExportConfig, export

    root = tmp_path_factory.mktemp("bundles")
    return {arch: export(ExportConfig(model=str(path), out=str(root / arch), lora_rank=4, lora_alpha=8,
                                      lars_basis="none"))
            for arch, path in tiny_models.items() if arch in ("llama", "qwen2")}
