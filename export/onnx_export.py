"""torch -> ONNX with the TorchScript exporter, in the form ORT 1.19.2 can differentiate.

Why this exporter and these settings: opset 17, eager attention, no constant folding (folding
transposes weights into anonymous initializers and loses the parameter names), EVAL mode, dynamic batch and
sequence axes. The dynamo exporter works too but renames or folds parameters unless optimize=False; the TorchScript
one keeps the PEFT names, which the manifest maps to PEFT keys.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from lars_artifacts import ATTENTION_MASK, INPUT_IDS, LOGITS

from .adapters import GRAPH_PREFIX
from .architectures import prepare_for_export


def _wrapper(peft_model):
    import torch

    class FlatLogits(torch.nn.Module):
        """input_ids, attention_mask -> logits flattened to [batch*seq, vocab] (what the ORT loss block takes)."""

        def __init__(self, model):
            super().__init__()
            self.model = model  # graph names start with GRAPH_PREFIX

        def forward(self, input_ids, attention_mask):
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            return logits.reshape(-1, logits.shape[-1])

    assert GRAPH_PREFIX == "model."
    return FlatLogits(peft_model).eval()


WEIGHTS_FILE = "model.onnx_data"


def export_onnx(peft_model, path: str | os.PathLike, opset: int, vocab_size: int) -> None:
    """Write the graph to `path` and the frozen weights to WEIGHTS_FILE beside it (external data); the trainable
    tensors (the adapters) stay inline.

    The graph is traced without its parameters (export_params=False: the same nodes, the parameters as graph inputs
    named as in the model), then every parameter input becomes an initializer written straight from the torch
    tensor: the exporter never holds a serialised copy of the weights (with them it peaked at 4.3x a 0.5B model's
    float32 size), and no two parameters are merged because they happen to be equal (the TorchScript exporter
    deduplicates equal initializers, e.g. all-zero lora_B tensors)."""
    import onnx
    import torch
    from onnx import helper

    from .external_data import ExternalDataWriter

    prepare_for_export(peft_model)
    wrapper = _wrapper(peft_model)
    # Batch 2 x 8 tokens with one padded row, so the mask path is traced with real padding.
    ids = torch.randint(0, vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper, (ids, mask), str(path),
            input_names=[INPUT_IDS, ATTENTION_MASK], output_names=[LOGITS],
            dynamic_axes={INPUT_IDS: {0: "batch", 1: "sequence"}, ATTENTION_MASK: {0: "batch", 1: "sequence"},
                          LOGITS: {0: "tokens"}},
            opset_version=opset, do_constant_folding=False, training=torch.onnx.TrainingMode.EVAL,
            export_params=False, dynamo=False)

    model = onnx.load(str(path))
    params = dict(wrapper.named_parameters())
    inputs = [i for i in model.graph.input if i.name in params]
    (Path(path).parent / WEIGHTS_FILE).unlink(missing_ok=True)
    with ExternalDataWriter(Path(path).parent / WEIGHTS_FILE) as weights:
        for graph_input in inputs:
            value = params[graph_input.name].detach().contiguous().numpy()  # a view of the torch storage
            tensor = onnx.TensorProto(name=graph_input.name, data_type=helper.np_dtype_to_tensor_dtype(value.dtype),
                                      dims=value.shape)
            if params[graph_input.name].requires_grad:
                tensor.raw_data = value.tobytes()
            else:
                weights.add(tensor, value)
            model.graph.initializer.append(tensor)
            model.graph.input.remove(graph_input)
    onnx.save_model(model, str(path))


def zero_lora_b(model_proto, names: set[str]) -> int:
    """Set the named initializers (the lora_B tensors) to zero in place: PEFT's B = 0 initialisation."""
    from onnx import numpy_helper

    done = 0
    for init in model_proto.graph.initializer:
        if init.name in names:
            zeros = np.zeros(tuple(init.dims), dtype=numpy_helper.to_array(init).dtype)
            init.CopyFrom(numpy_helper.from_array(zeros, init.name))
            done += 1
    return done
