"""`qfx::kernel_linear`: the op the backend lowers `qfx::quantized_linear` to on CUDA.

It holds the weight in a kernel layout (see `kernels.layout`), packed once at compile time,
and runs the Triton kernel chosen by `kernel`: "wint_a16" (weight-only) or "act_quant"
(int8/fp8 activations quantized per token inside the GEMM). Inductor keeps it as an extern
call; its fake implementation gives the output shape for tracing.
"""

from __future__ import annotations

import torch

from qfx.lowering.kernels.layout import KernelWeight

KERNELS = ("wint_a16", "act_quant")


def as_kernel_weight(data, scale, zero, bits: int, group: int, n: int, k: int) -> KernelWeight:
    return KernelWeight("packed" if data.dtype == torch.int32 else "rows", data, scale, zero, bits, group, n, k)


@torch.library.custom_op("qfx::kernel_linear", mutates_args=())
def kernel_linear(
    x: torch.Tensor,
    data: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    bias: torch.Tensor | None,
    a_scale: torch.Tensor | None,
    kernel: str,
    bits: int,
    group: int,
    n: int,
    k: int,
) -> torch.Tensor:
    """y (..., N) = kernel(x (..., K)) with the weight held as `KernelWeight` fields."""
    kw = as_kernel_weight(data, scale, zero, bits, group, n, k)
    if kernel == "wint_a16":
        from qfx.lowering.kernels.wint_a16 import wint_a16_linear

        return wint_a16_linear(x, kw, bias)
    if kernel == "act_quant":
        from qfx.lowering.kernels.act_quant_gemm import act_quant_linear

        return act_quant_linear(x, kw, a_scale, bias)
    raise ValueError(f"kernel_linear: unknown kernel {kernel!r}; expected one of {KERNELS}")


@kernel_linear.register_fake
def _(x, data, scale, zero, bias, a_scale, kernel, bits, group, n, k):
    torch._check(x.shape[-1] == k, lambda: f"kernel_linear: x has {x.shape[-1]} features, expected {k}")
    return x.new_empty((*x.shape[:-1], n))
