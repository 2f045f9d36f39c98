"""Lowering: ORT's training graph (training_model.onnx) -> a standard-ONNX training step plain onnxruntime runs.

ORT's gradient graph uses com.microsoft training ops (ConcatTraining, SoftmaxGrad_13, ...) that only the training
build has. Each rule replaces one such op by standard ONNX ops computing the same numbers; lower_training_step also
turns ORT's gradient accumulation into plain `<param>_grad` outputs. One file per rule (find: op type + domain;
check; replace), each with a sibling test against the training build's kernel. Adding a rule: a file, its test and
one line in RULES.
"""

from __future__ import annotations

from ._rule import Builder, Lowering, Rule
from .concat_training import CONCAT_TRAINING
from .fused_matmul import FUSED_MATMUL
from .in_place_accumulator import IN_PLACE_ACCUMULATOR
from .quick_gelu import QUICK_GELU
from .quick_gelu_grad import QUICK_GELU_GRAD
from .sigmoid_grad import SIGMOID_GRAD
from .simplified_layer_norm import SIMPLIFIED_LAYER_NORM
from .simplified_layer_norm_grad import SIMPLIFIED_LAYER_NORM_GRAD
from .slice_grad import SLICE_GRAD
from .softmax_cross_entropy_loss import SOFTMAX_CROSS_ENTROPY_LOSS
from .softmax_cross_entropy_loss_grad import SOFTMAX_CROSS_ENTROPY_LOSS_GRAD
from .softmax_grad import SOFTMAX_GRAD
from .split_training import SPLIT_TRAINING
from .tanh_grad import TANH_GRAD

# The ordered list of rules (the first whose op matches a node lowers it).
RULES: list[Rule] = [
    IN_PLACE_ACCUMULATOR,
    CONCAT_TRAINING,
    SPLIT_TRAINING,
    SLICE_GRAD,
    SOFTMAX_GRAD,
    SOFTMAX_CROSS_ENTROPY_LOSS,
    SOFTMAX_CROSS_ENTROPY_LOSS_GRAD,
    SIMPLIFIED_LAYER_NORM_GRAD,
    QUICK_GELU_GRAD,
    SIGMOID_GRAD,
    TANH_GRAD,
    # strict=True only: contrib ops plain onnxruntime runs
    FUSED_MATMUL,
    QUICK_GELU,
    SIMPLIFIED_LAYER_NORM,
]

from .lower import LoweringReport, lower_ops, lower_training_step  # noqa: E402 (lower reads RULES)

__all__ = ["RULES", "Builder", "Lowering", "LoweringReport", "Rule", "lower_ops", "lower_training_step"]
