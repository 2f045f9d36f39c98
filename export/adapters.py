"""LoRA adapters added with PEFT, made safe for the TorchScript exporter.

PEFT initialises every lora_B to zeros. The TorchScript exporter merges identical initializers, so all-zero B
tensors of one shape would collapse into one shared parameter and training would go silently wrong. We therefore
give each B a distinct random value for the export and set B = 0 again in the ONNX graph before ORT builds the
training artifacts (see onnx_export.zero_lora_b); the pipeline's graph check fails the export if any tensor was
merged (every adapter tensor must be an initializer of its own).
"""

from __future__ import annotations

import warnings

from lars_artifacts import AdapterParameter, LarsError

from .config import ExportConfig


AdapterParam = AdapterParameter  # one trainable tensor: its graph name, PEFT key and shape (lars_artifacts.schema)


# The exporter wraps the PEFT model in a module whose attribute is `model`: graph names start with this prefix.
GRAPH_PREFIX = "model."


def add_lora(model, config: ExportConfig):
    import torch
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, target_modules=config.target_modules(),
                      lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    torch.manual_seed(config.seed)
    try:
        with warnings.catch_warnings():  # PEFT calls a deprecated transformers API; not the user's business
            warnings.simplefilter("ignore", FutureWarning)
            peft_model = get_peft_model(model, lora)
    except ValueError as e:
        raise LarsError(f"cannot adapt --targets {','.join(config.targets)}: {str(e).splitlines()[0]}; "
                        f"choose among q,k,v,o,gate,up,down") from None
    generator = torch.Generator().manual_seed(config.seed + 1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # distinct values for the export only; zeroed in the graph afterwards
                p.copy_(torch.randn(p.shape, generator=generator) * 1e-3)
    return peft_model, lora


def adapter_params(peft_model) -> list[AdapterParam]:
    params = []
    for name, p in peft_model.named_parameters():
        if p.requires_grad:
            peft_key = name.replace(".default.", ".")  # what PEFT's get_peft_model_state_dict writes
            params.append(AdapterParam(GRAPH_PREFIX + name, peft_key, list(p.shape)))
    return params


def peft_config_dict(lora, base_model_name_or_path: str) -> dict:
    """adapter_config.json contents, as PEFT itself writes them."""
    cfg = lora.to_dict()
    cfg["base_model_name_or_path"] = base_model_name_or_path
    cfg["target_modules"] = sorted(cfg["target_modules"]) if cfg.get("target_modules") else cfg.get("target_modules")
    for key, value in list(cfg.items()):  # sets and enums are not JSON
        if isinstance(value, set):
            cfg[key] = sorted(value)
        elif hasattr(value, "value"):
            cfg[key] = value.value
    return cfg


def peft_reference(model, manifest, adapters: dict):
    """PyTorch + PEFT LoRA on `model` (a transformers causal LM) as a bundle's manifest describes it, its adapter
    tensors set to `adapters` ({graph name: array}, e.g. a checkpoint's): the reference that tests and tools compare
    lars against."""
    import torch
    from peft import LoraConfig, get_peft_model

    config = manifest.adapter["peft_config"]
    peft_model = get_peft_model(model, LoraConfig(r=config["r"], lora_alpha=config["lora_alpha"], lora_dropout=0.0,
                                                  target_modules=config["target_modules"], task_type="CAUSAL_LM"))
    params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for p in manifest.adapter["parameters"]:
            params[p["onnx_name"].removeprefix(GRAPH_PREFIX)].copy_(torch.from_numpy(adapters[p["onnx_name"]]))
    return peft_model
