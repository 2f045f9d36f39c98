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

Written on onnx_ir (passes/_ir.py).
"""

from __future__ import annotations

import logging

import numpy as np

from ._base import GraphPass, PassContext, PassReport
from ._ir import new_initializer, values_by_name

log = logging.getLogger(__name__)


def find(graph, context: PassContext):
    """For each trainable lora_A: (name, forward input x, gradient Transpose, its Gemm, Reshape(x) feeding it)."""
    values = values_by_name(graph)
    for name in sorted(context.trainable):
        if ".lora_A." not in name:
            continue
        grad_value = values.get(f"{name}_grad")
        grad = grad_value.producer() if grad_value is not None else None
        gemm = grad.inputs[0].producer() if grad is not None and grad.op_type == "Transpose" else None
        reshape = gemm.inputs[0].producer() if gemm is not None and gemm.op_type == "Gemm" else None
        if reshape is not None and reshape.op_type != "Reshape":
            reshape = None  # a 2-D x feeds the Gemm directly
        a = values.get(name)
        fwd = next((m.node for t in (a.uses() if a is not None else []) if t.node.op_type == "Transpose"
                    for m in t.node.outputs[0].uses() if m.node.op_type == "MatMul"), None)
        yield name, (fwd.inputs[0] if fwd is not None else None), grad, gemm, reshape


def check(name, x, grad, gemm, reshape, context: PassContext) -> str | None:
    if name not in context.lars_bases:
        return "no basis for this adapter"
    if x is None:
        return "forward MatMul(x, Transpose(A)) not found"
    if grad is None or gemm is None or grad.op_type != "Transpose":
        return "gradient is not Transpose(Gemm(...)) (ORT changed its MatMul gradient?)"
    reads_x = gemm.inputs[0] is x or (reshape is not None and reshape.inputs[0] is x)
    if gemm.attributes.get_int("transA", 0) != 1 or not reads_x:
        return "gradient Gemm does not read x (or Reshape(x)) with transA=1"
    return None


def _node(op: str, inputs: list, output: str, name: str):
    import onnx_ir as ir

    return ir.node(op, inputs, name=name, outputs=[ir.Value(name=output)])


def apply(model, context: PassContext) -> PassReport:
    graph = model.graph
    report = PassReport("lars_projection")
    if not context.lars_bases:
        report.skipped.append("no bases: exact LoRA (--lars-basis none)")
        return report
    projected: dict = {}  # x -> (x̃, P, k)
    freed_widths: dict[str, int] = {}
    for name, x, grad, gemm, reshape in list(find(graph, context)):
        why_not = check(name, x, grad, gemm, reshape, context)
        if why_not:
            log.info("lars_projection: leaving %s: %s", name, why_not)
            report.skipped.append(f"{name}: {why_not}")
            continue
        basis = np.ascontiguousarray(context.lars_bases[name], dtype=np.float32)  # [d, k]
        d, k = basis.shape
        if x not in projected:
            p_name = f"lars.P.{name.removesuffix('.lora_A.default.weight').removesuffix('.lora_A.weight')}"
            p = new_initializer(graph, p_name, [basis], basis.dtype, basis.shape, context)
            project = _node("MatMul", [x, p], f"{x.name}.lars_xP", f"{p_name}/Project")
            # right after x is made, so the forward computes x̃ while x is alive
            if x.producer() is not None:
                graph.insert_after(x.producer(), project)
            else:
                graph.insert_before(graph.node(0), project)
            projected[x] = (project.outputs[0], p, k)
            freed_widths[x.name] = d - k
        x_tilde, p, k_shared = projected[x]
        prefix = gemm.name.rsplit("/", 1)[0] + "/LARS"
        if reshape is not None:  # [..., d] inputs are flattened to [-1, d]; flatten x̃ to [-1, k] the same way
            shape = new_initializer(graph, f"{prefix}/xP_shape", [np.array([-1, k_shared], np.int64)], np.int64,
                                    (2,), context)
            flatten = _node("Reshape", [x_tilde, shape], f"{prefix}/xP_2d", f"{prefix}/Reshape")
            graph.insert_before(gemm, flatten)
            gemm.replace_input_with(0, flatten.outputs[0])
        else:
            gemm.replace_input_with(0, x_tilde)
        small = gemm.outputs[0]  # now [k, r]: renamed, its recorded [d, r] shape dropped
        small.name, small.shape, small.type = f"{prefix}/dAT_small", None, None
        lift = _node("MatMul", [p, small], f"{prefix}/dAT", f"{prefix}/LiftP")
        graph.insert_after(gemm, lift)
        grad.replace_input_with(0, lift.outputs[0])
        # The old Reshape(x) is dead once no Gemm reads it.
        if reshape is not None and not reshape.outputs[0].uses():
            graph.remove(reshape, safe=True)
        report.changed += 1
    # Bytes per token that no longer outlive the forward: the full x minus the kept x̃, per distinct input.
    report.bytes_freed, report.freed_per = 4 * sum(freed_widths.values()), "token"
    report.details = {"distinct_inputs": len(projected),
                      "ranks": sorted({k for _, _, k in projected.values()})}
    return report


LARS_PROJECTION = GraphPass("lars_projection", "training", apply, ir=True)
