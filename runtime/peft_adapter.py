"""Export a run's adapters as a PEFT LoRA adapter: adapter_config.json + adapter_model.safetensors.

Keys follow PEFT: base_model.model.<module path>.lora_A.weight [r, in] and .lora_B.weight [out, r]; the manifest
records each graph tensor's PEFT key at export time, so nothing here guesses names.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lars_artifacts import Bundle, LarsError

from .config import check_output_directory

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def write_peft_adapter(bundle: Bundle, tensors: dict[str, np.ndarray], out: str | Path) -> Path:
    from safetensors.numpy import save_file

    check_output_directory(out, "adapter directory")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {}
    for p in bundle.manifest.adapter_parameters:
        if p.onnx_name not in tensors:
            raise LarsError(f"adapter tensor {p.onnx_name} is missing from the run's checkpoint; "
                            f"the run belongs to another bundle")
        value = np.ascontiguousarray(tensors[p.onnx_name], dtype=np.float32)
        if list(value.shape) != p.shape:
            raise LarsError(f"adapter tensor {p.onnx_name} has shape {list(value.shape)}, the bundle says "
                            f"{p.shape}: the run belongs to another bundle")
        state[p.peft_key] = value
    tmp = out / f".{ADAPTER_WEIGHTS}.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / ADAPTER_WEIGHTS)
    (out / ADAPTER_CONFIG).write_text(json.dumps(bundle.manifest.adapter["peft_config"], indent=2) + "\n")
    return out
