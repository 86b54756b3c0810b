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

Online rotations (`qfx::hadamard`, QuaRot's R3/R4): one that feeds an int8/fp8-activation
linear is taken into it ("hadamard_act_quant": x rotated and quantized in one pass); the others
become `qfx::kernel_hadamard`, where `kernels.hadamard_rows.supported` allows their size.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from qfx.lowering.constant_inputs import ConstantInputs
from qfx.lowering.kernel_op import KernelLinearArgs
from qfx.lowering.kernels import act_quant_gemm, hadamard_rows, split_k, wint_a16
from qfx.lowering.kernels.layout import kernel_weight
from qfx.ops import NO_ACT_QUANT, QuantizedLinearArgs
from qfx.passes import finish

QUANTIZED_LINEAR = torch.ops.qfx.quantized_linear.default
KERNEL_LINEAR = torch.ops.qfx.kernel_linear.default
HADAMARD = torch.ops.qfx.hadamard.default
KERNEL_HADAMARD = torch.ops.qfx.kernel_hadamard.default


def tensor_behind(node, inputs: dict[Node, torch.Tensor], gm: GraphModule):
    """The real tensor behind a placeholder or get_attr node (None for None)."""
    if node is None:
        return None
    if node.op == "placeholder":
        return inputs[node]
    if node.op == "get_attr":
        return gm.get_parameter(node.target) if node.target in dict(gm.named_parameters()) else gm.get_buffer(node.target)
    raise ValueError(f"{node.name}: quantized_linear tensors must be graph inputs or constants, got {node.op}")


def _value(node: Node):
    return node.meta.get("example_value", node.meta.get("val"))


def _x_dtype(node: Node) -> torch.dtype | None:
    return getattr(_value(node.args[0]), "dtype", None)


class _Mixes:
    """One constant input per rotation size for the `mix` factor of the kernels that rotate."""

    def __init__(self, constants: ConstantInputs):
        self.constants, self.nodes = constants, {}

    def get(self, n: int, device: torch.device) -> Node | None:
        if (n, device) not in self.nodes:
            mix = hadamard_rows.mix_factor(n)
            self.nodes[n, device] = None if mix is None else self.constants.add(
                f"_qfx_hadamard_mix_{n}_{len(self.nodes)}", mix.to(device))
        return self.nodes[n, device]


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
    lowered, fused_rotations, unsupported = 0, 0, []
    mixes = _Mixes(constants)
    for node in [n for n in gm.graph.nodes if n.op == "call_function" and n.target == QUANTIZED_LINEAR]:
        a = QuantizedLinearArgs.of(node)
        x, w_bits, group_size = a.x, a.w_bits, a.group_size
        if a.a_clip != 1.0:
            unsupported.append(f"{node.name}: activation clip ratio {a.a_clip} has no kernel yet")
            continue
        qweight = tensor_behind(a.qweight, inputs, gm)
        if not qweight.is_cuda and not _interpreting():
            unsupported.append(f"{node.name}: weights on {qweight.device}, kernels run on CUDA")
            continue
        zero = tensor_behind(a.w_zero, inputs, gm)
        kernel, why = choose_kernel(w_bits, group_size, zero, a.a_bits, qweight.dtype == torch.float8_e4m3fn,
                                    _x_dtype(node))
        if kernel is None:
            unsupported.append(f"{node.name}: {why}")
            continue
        int8_rows = kernel == "act_quant" and w_bits == 8 and qweight.dtype == torch.uint8
        kw = kernel_weight(qweight, tensor_behind(a.w_scale, inputs, gm), zero, w_bits, group_size, a.in_features,
                           int8_rows)
        check = wint_a16.supported if kernel == "wint_a16" else act_quant_gemm.supported
        if not check(kw):
            unsupported.append(f"{node.name}: shape not supported by {kernel}")
            continue
        split_k.counters(kw.data.device)  # made now: made during a CUDA-graph warm-up it would sit in the graph's pool
        attrs = {f: constants.add(f"_qfx_kernel_{lowered}_{f}", getattr(kw, f)) for f in ("data", "scale", "zero")}
        mix = None
        if kernel == "act_quant" and _is_hadamard(x) and hadamard_rows.supported(kw.k, _x_dtype(node))[0]:
            kernel, mix, x = "hadamard_act_quant", mixes.get(kw.k, kw.data.device), x.args[0]  # x before the rotation
            fused_rotations += 1
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(KERNEL_LINEAR, tuple(KernelLinearArgs(
                x, attrs["data"], attrs["scale"], attrs["zero"], a.bias, a.a_scale, kernel, kw.bits, kw.group, kw.n,
                kw.k, mix)))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        lowered += 1
    rotations = _lower_rotations(gm, mixes, unsupported)
    finish(gm, "lower_kernels", lowered + rotations)
    return {"lowered": lowered, "rotations_fused": fused_rotations, "rotations_lowered": rotations,
            "unsupported": unsupported}


def _is_hadamard(node) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target == HADAMARD


def _lower_rotations(gm: GraphModule, mixes: _Mixes, unsupported: list[str]) -> int:
    """`qfx::hadamard` -> `qfx::kernel_hadamard` where the kernel takes it; drops rotations whose
    only reader was fused into a GEMM. Returns how many were lowered."""
    lowered = 0
    for node in [n for n in gm.graph.nodes if _is_hadamard(n)]:
        if not node.users:
            gm.graph.erase_node(node)
            continue
        val = _value(node.args[0])
        if not (val.is_cuda or _interpreting()):
            ok, why = False, f"input on {val.device}, kernels run on CUDA"
        elif val.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            ok, why = False, f"{val.dtype} input (the kernel takes bf16, fp16 or fp32)"
        else:
            ok, why = hadamard_rows.supported(val.shape[-1], val.dtype)
        if not ok:
            unsupported.append(f"{node.name}: {why}")
            continue
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(KERNEL_HADAMARD, (node.args[0], mixes.get(val.shape[-1], val.device)))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        lowered += 1
    return lowered


def _interpreting() -> bool:
    from qfx.lowering.kernels import interpreting

    return interpreting()
