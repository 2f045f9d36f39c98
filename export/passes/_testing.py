"""What the passes' sibling tests share: a LoRA linear in PEFT's parameter layout, and an ORT training Module."""

from __future__ import annotations


def lora_linear(d_in: int, d_out: int, rank: int, scale: float = 2.0):
    """A torch module y = x·Wᵀ + scale·(x·Aᵀ)·Bᵀ named like PEFT's (base_layer, lora_A.default, lora_B.default)."""
    import torch

    class LoraLinear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.base_layer = torch.nn.Linear(d_in, d_out, bias=False)
            self.lora_A = torch.nn.ModuleDict({"default": torch.nn.Linear(d_in, rank, bias=False)})
            self.lora_B = torch.nn.ModuleDict({"default": torch.nn.Linear(rank, d_out, bias=False)})

        def forward(self, x):
            return self.base_layer(x) + self.lora_B["default"](self.lora_A["default"](x)) * scale

    return LoraLinear()


def ort_module(directory, optimized_to=None, priority_order: bool = True):
    """(C bindings, checkpoint state, Module) over the artifacts in `directory`; optionally dump ORT's optimised
    training graph to `optimized_to` (what ORT actually runs)."""
    from onnxruntime.capi import _pybind_state as C

    state = C.load_checkpoint(str(directory / "checkpoint"))
    options = C.SessionOptions()
    if priority_order:
        options.execution_order = C.ExecutionOrder.PRIORITY_BASED  # what the runtime uses
    if optimized_to:
        options.optimized_model_filepath = str(optimized_to)
    device = C.OrtDevice(C.OrtDevice.cpu(), C.OrtDevice.default_memory(), 0)
    return C, state, C.Module(str(directory / "training_model.onnx"), state, None, device, options)
