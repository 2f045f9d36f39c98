"""LARS: the backward consumes rank-k projections of the adapter inputs instead of the full tensors.

For an adapted linear y = x·W + s·(x·Aᵀ)·Bᵀ, the only backward consumer of x (T×d) is the LoRA-A weight gradient,
which ORT builds as

    dAᵀ = Gemm(transA=1)(Reshape(x, [-1, d]), Reshape(dY, [-1, r]))  ->  Transpose  ->  A_grad

The pass stores x̃ = x·P (P: d×k, a frozen initializer) in the forward and rewrites the gradient to

    dAᵀ ≈ P · Gemm(transA=1)(Reshape(x̃, [-1, k]), Reshape(dY, [-1, r]))

so x has no backward consumer and ORT frees it once the forward is done with it. Adapters that share an input
(q, k, v; gate, up) share one x̃. With P·Pᵀ = I (k = d) the gradient is exact.

The bases come from the exporter (lars_export.basis): one d×k matrix per adapter, keyed by the adapter's lora_A
parameter name.
"""

from __future__ import annotations

import logging

import numpy as np

from ._base import GraphPass, PassContext, PassReport, consumers, producers

log = logging.getLogger(__name__)


def find(model, context: PassContext):
    """For each trainable lora_A: (name, forward input x, gradient Gemm, Reshape(x) feeding it)."""
    prod, cons = producers(model), consumers(model)
    for name in sorted(context.trainable):
        if ".lora_A." not in name:
            continue
        grad = prod.get(f"{name}_grad")
        gemm = prod.get(grad.input[0]) if grad is not None and grad.op_type == "Transpose" else None
        reshape = prod.get(gemm.input[0]) if gemm is not None and gemm.op_type == "Gemm" else None
        if reshape is not None and reshape.op_type != "Reshape":
            reshape = None  # a 2-D x feeds the Gemm directly
        fwd = next((m for t in cons.get(name, []) if t.op_type == "Transpose"
                    for m in cons.get(t.output[0], []) if m.op_type == "MatMul"), None)
        yield name, (fwd.input[0] if fwd is not None else None), grad, gemm, reshape


def check(name, x, grad, gemm, reshape, context: PassContext) -> str | None:
    if name not in context.lars_bases:
        return "no basis for this adapter"
    if x is None:
        return "forward MatMul(x, Transpose(A)) not found"
    if grad is None or gemm is None or grad.op_type != "Transpose":
        return "gradient is not Transpose(Gemm(...)) (ORT changed its MatMul gradient?)"
    trans_a = next((a.i for a in gemm.attribute if a.name == "transA"), 0)
    reads_x = gemm.input[0] == x or (reshape is not None and reshape.input[0] == x)
    if trans_a != 1 or not reads_x:
        return "gradient Gemm does not read x (or Reshape(x)) with transA=1"
    return None


def _insert_after(model, anchor_output: str, new_nodes: list) -> None:
    """Insert nodes right after the producer of anchor_output, so the forward computes them while x is alive."""
    nodes = model.graph.node
    at = next((i for i, n in enumerate(nodes) if anchor_output in n.output), -1)
    for offset, node in enumerate(new_nodes):
        nodes.insert(at + 1 + offset, node)


def apply(model, context: PassContext) -> PassReport:
    from onnx import helper, numpy_helper

    report = PassReport("lars_projection")
    if not context.lars_bases:
        report.skipped.append("no bases: exact LoRA (--lars-basis none)")
        return report
    projected: dict[str, tuple[str, str, int]] = {}  # x -> (x̃ name, P name, k)
    freed_widths: dict[str, int] = {}
    for name, x, grad, gemm, reshape in list(find(model, context)):
        why_not = check(name, x, grad, gemm, reshape, context)
        if why_not:
            log.info("lars_projection: leaving %s: %s", name, why_not)
            report.skipped.append(f"{name}: {why_not}")
            continue
        basis = np.ascontiguousarray(context.lars_bases[name], dtype=np.float32)  # [d, k]
        d, k = basis.shape
        if x not in projected:
            p_name = f"lars.P.{name.removesuffix('.lora_A.default.weight').removesuffix('.lora_A.weight')}"
            model.graph.initializer.append(numpy_helper.from_array(basis, p_name))
            x_tilde = f"{x}.lars_xP"
            _insert_after(model, x, [helper.make_node("MatMul", [x, p_name], [x_tilde], name=f"{p_name}/Project")])
            projected[x] = (x_tilde, p_name, k)
            freed_widths[x] = d - k
        x_tilde, p_name, k_shared = projected[x]
        prefix = gemm.name.rsplit("/", 1)[0] + "/LARS"
        small, full = f"{prefix}/dAT_small", f"{prefix}/dAT"
        at = list(model.graph.node).index(gemm)
        if reshape is not None:  # [..., d] inputs are flattened to [-1, d]; flatten x̃ to [-1, k] the same way
            shape_name, xp2d = f"{prefix}/xP_shape", f"{prefix}/xP_2d"
            model.graph.initializer.append(numpy_helper.from_array(np.array([-1, k_shared], np.int64), shape_name))
            model.graph.node.insert(at, helper.make_node("Reshape", [x_tilde, shape_name], [xp2d],
                                                         name=f"{prefix}/Reshape"))
            at += 1
            gemm.input[0] = xp2d
        else:
            gemm.input[0] = x_tilde
        gemm.output[0] = small
        grad.input[0] = full
        model.graph.node.insert(at + 1, helper.make_node("MatMul", [p_name, small], [full], name=f"{prefix}/LiftP"))
        # The old Reshape(x) is dead once no Gemm reads it.
        if reshape is not None and not any(reshape.output[0] in n.input for n in model.graph.node):
            model.graph.node.remove(reshape)
        report.changed += 1
    # Bytes per token that no longer outlive the forward: the full x minus the kept x̃, per distinct input.
    report.bytes_freed, report.freed_per = 4 * sum(freed_widths.values()), "token"
    report.details = {"distinct_inputs": len(projected),
                      "ranks": sorted({k for _, _, k in projected.values()})}
    return report


LARS_PROJECTION = GraphPass("lars_projection", "training", apply)
