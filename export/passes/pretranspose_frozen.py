"""Store frozen weights pre-transposed: Transpose(W) of a frozen initializer becomes the initializer Wᵀ.

Why: the exporter writes nn.Linear as MatMul(x, Transpose(W)). ORT's training-graph optimiser folds those
transposes into new anonymous initializers in training_model.onnx but not in eval_model.onnx, so the two graphs
would hold differently named copies of every weight (and could not share one weights file). Folding them here,
before ORT sees the graph, is lossless and gives both graphs the same initializers. Adapters (trainable) are never
touched: their transposes must stay in the graph for the gradient.
"""

from __future__ import annotations

import logging

import numpy as np

from ._base import (GraphPass, PassContext, PassReport, consumers, initializer_map, initializer_nbytes,
                    initializer_value, make_initializer)

log = logging.getLogger(__name__)


def find(model, context: PassContext):
    """Transpose nodes whose only input is a frozen initializer (the adapters' transposes stay: ORT differentiates
    through them)."""
    inits = initializer_map(model)
    for node in model.graph.node:
        if node.op_type == "Transpose" and node.input and node.input[0] in inits \
                and node.input[0] not in context.trainable:
            yield node, inits[node.input[0]]


def check(node, weight, context: PassContext) -> str | None:
    """None if the rewrite may apply, else why not."""
    if weight.data_type != 1:  # float32 only; other types are rare here and not worth the risk
        return f"{weight.name} is not float32"
    return None


def replace(model, node, weight, context: PassContext) -> None:
    perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
    value = initializer_value(weight, context)
    transposed = np.ascontiguousarray(np.transpose(value, perm) if perm else value.T)
    model.graph.initializer.append(make_initializer(transposed, node.output[0], context))
    model.graph.node.remove(node)


def apply(model, context: PassContext) -> PassReport:
    report = PassReport("pretranspose_frozen")
    for node, weight in list(find(model, context)):
        why_not = check(node, weight, context)
        if why_not:
            log.info("pretranspose_frozen: leaving %s: %s", node.name, why_not)
            report.skipped.append(f"{node.name}: {why_not}")
            continue
        replace(model, node, weight, context)
        report.changed += 1
        report.bytes_freed += initializer_nbytes(weight)  # the Transpose's output, made every step
        report.freed_per = "step"
    # Drop weights nothing reads any more (their transposed copy replaced them); tied embeddings stay, the Gather
    # still reads them.
    used = consumers(model)
    outputs = {o.name for o in model.graph.output}
    dropped = [i for i in model.graph.initializer if i.name not in used and i.name not in outputs
               and i.name not in context.trainable]
    for init in dropped:
        model.graph.initializer.remove(init)
    report.details["dropped_initializers"] = len(dropped)
    return report


PRETRANSPOSE_FROZEN = GraphPass("pretranspose_frozen", "forward", apply)
