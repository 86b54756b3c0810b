"""Backend pass: `qfx::quantized_linear` -> `qfx::kernel_linear` where a Triton kernel computes it.

Requires: a Dynamo graph whose quantized_linear weights are placeholders (their tensors in
`example_inputs`) or get_attr constants.
Guarantees: each op a kernel supports reads its weight in the kernel layout from new graph
inputs `_qfx_kernel_<i>_<field>` (placed after the original ones; the backend passes their
tensors, packed now from the current weights: like Inductor's freezing, recompile after
changing weights); the rest are left for the reference decomposition, and `unsupported` says
why.

Lowered: weight-only int (any bits, groups that are a multiple of 16 or per channel) and fp8
weights with bf16/fp16 activations; int8 activations with symmetric int weights (groups a
multiple of 32 or per channel); fp8 activations with fp8 weights.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from qfx.lowering.constant_inputs import ConstantInputs
from qfx.lowering.kernels import act_quant_gemm, split_k, wint_a16
from qfx.lowering.kernels.layout import kernel_weight
from qfx.ops import NO_ACT_QUANT

QUANTIZED_LINEAR = torch.ops.qfx.quantized_linear.default
KERNEL_LINEAR = torch.ops.qfx.kernel_linear.default


def tensor_behind(node, inputs: dict[Node, torch.Tensor], gm: GraphModule):
    """The real tensor behind a placeholder or get_attr node (None for None)."""
    if node is None:
        return None
    if node.op == "placeholder":
        return inputs[node]
    if node.op == "get_attr":
        return gm.get_parameter(node.target) if node.target in dict(gm.named_parameters()) else gm.get_buffer(node.target)
    raise ValueError(f"{node.name}: quantized_linear tensors must be graph inputs or constants, got {node.op}")


def _x_dtype(node: Node) -> torch.dtype | None:
    val = node.args[0].meta.get("example_value", node.args[0].meta.get("val"))
    return getattr(val, "dtype", None)


def choose_kernel(w_bits, group_size, w_zero, a_bits, fp8: bool, x_dtype) -> tuple[str | None, str]:
    """(kernel name or None, reason when None) for one quantized_linear."""
    if a_bits == NO_ACT_QUANT:
        if x_dtype not in (torch.bfloat16, torch.float16):
            return None, f"weight-only kernels take bf16/fp16 activations, not {x_dtype}"
        if group_size and group_size % 16:
            return None, f"group size {group_size} is not a multiple of 16"
        return "wint_a16", ""
    if a_bits != 8:
        return None, f"{a_bits}-bit activations have no kernel yet"
    if not fp8 and w_zero is not None:
        return None, "int8 activations take symmetric weights (zero points do not fit int8)"
    if group_size and (group_size % 32 or fp8):
        return None, f"group size {group_size} with int8/fp8 activations (needs a multiple of 32, or per channel)"
    return "act_quant", ""


def lower_kernels(gm: GraphModule, example_inputs, constants: ConstantInputs) -> dict[str, object]:
    """Rewrite in place, adding the packed weights to `constants`; returns
    {"lowered": count, "unsupported": [reasons]}."""
    inputs = dict(zip([n for n in gm.graph.nodes if n.op == "placeholder"], example_inputs))
    lowered, unsupported = 0, []
    for node in [n for n in gm.graph.nodes if n.op == "call_function" and n.target == QUANTIZED_LINEAR]:
        x, qw, w_scale, w_zero, bias, w_bits, group_size, in_features, a_bits, a_scale, *rest = node.args
        if rest and rest[0] != 1.0:
            unsupported.append(f"{node.name}: activation clip ratio {rest[0]} has no kernel yet")
            continue
        qweight = tensor_behind(qw, inputs, gm)
        if not qweight.is_cuda and not _interpreting():
            unsupported.append(f"{node.name}: weights on {qweight.device}, kernels run on CUDA")
            continue
        zero = tensor_behind(w_zero, inputs, gm)
        kernel, why = choose_kernel(w_bits, group_size, zero, a_bits, qweight.dtype == torch.float8_e4m3fn,
                                    _x_dtype(node))
        if kernel is None:
            unsupported.append(f"{node.name}: {why}")
            continue
        int8_rows = kernel == "act_quant" and w_bits == 8 and qweight.dtype == torch.uint8
        kw = kernel_weight(qweight, tensor_behind(w_scale, inputs, gm), zero, w_bits, group_size, in_features, int8_rows)
        check = wint_a16.supported if kernel == "wint_a16" else act_quant_gemm.supported
        if not check(kw):
            unsupported.append(f"{node.name}: shape not supported by {kernel}")
            continue
        split_k.counters(kw.data.device)  # made now: made during a CUDA-graph warm-up it would sit in the graph's pool
        attrs = {f: constants.add(f"_qfx_kernel_{lowered}_{f}", getattr(kw, f)) for f in ("data", "scale", "zero")}
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(KERNEL_LINEAR, (x, attrs["data"], attrs["scale"], attrs["zero"], bias, a_scale,
                                                        kernel, kw.bits, kw.group, kw.n, kw.k))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        lowered += 1
    gm.graph.lint()
    gm.recompile()
    return {"lowered": lowered, "unsupported": unsupported}


def _interpreting() -> bool:
    from qfx.lowering.kernels import interpreting

    return interpreting()
