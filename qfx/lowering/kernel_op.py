"""`qfx::kernel_linear`: the op the backend lowers `qfx::quantized_linear` to on CUDA.

It holds the weight in a kernel layout (see `kernels.layout`), packed once at compile time,
and runs the Triton kernel chosen by `kernel`: "wint_a16" (weight-only), "act_quant"
(int8/fp8 activations quantized per token inside the GEMM) or "hadamard_act_quant" (the same
GEMM on x @ H_K, the online rotation `qfx::hadamard` that fed it, rotated and quantized in one
pass over x; `mix` is the rotation's factor, see `kernels.hadamard_rows`). Inductor keeps it as
an extern call; its fake implementation gives the output shape for tracing.

`qfx::kernel_hadamard` is `qfx::hadamard` on the Triton kernel, where no GEMM takes it in.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from qfx.lowering.kernels.layout import KernelWeight

KERNELS = ("wint_a16", "act_quant", "hadamard_act_quant")


class KernelLinearArgs(NamedTuple):
    """The arguments of a `qfx::kernel_linear` call by name, in the op's order (see
    `qfx.ops.QuantizedLinearArgs`)."""

    x: Any
    data: Any
    scale: Any
    zero: Any
    bias: Any
    a_scale: Any
    kernel: str
    bits: int
    group: int
    n: int
    k: int
    mix: Any = None

    @classmethod
    def of(cls, node) -> "KernelLinearArgs":
        return cls(*node.args, **node.kwargs)


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
    mix: torch.Tensor | None = None,
) -> torch.Tensor:
    """y (..., N) = kernel(x (..., K)) with the weight held as `KernelWeight` fields."""
    kw = as_kernel_weight(data, scale, zero, bits, group, n, k)
    if kernel == "wint_a16":
        from qfx.lowering.kernels.wint_a16 import wint_a16_linear

        return wint_a16_linear(x, kw, bias)
    if kernel in ("act_quant", "hadamard_act_quant"):
        from qfx.lowering.kernels.act_quant_gemm import act_quant_linear

        return act_quant_linear(x, kw, a_scale, bias, hadamard=kernel == "hadamard_act_quant", mix=mix)
    raise ValueError(f"kernel_linear: unknown kernel {kernel!r}; expected one of {KERNELS}")


@kernel_linear.register_fake
def _(x, data, scale, zero, bias, a_scale, kernel, bits, group, n, k, mix=None):
    torch._check(x.shape[-1] == k, lambda: f"kernel_linear: x has {x.shape[-1]} features, expected {k}")
    return x.new_empty((*x.shape[:-1], n))


@torch.library.custom_op("qfx::kernel_hadamard", mutates_args=())
def kernel_hadamard(x: torch.Tensor, mix: torch.Tensor | None) -> torch.Tensor:
    """x (..., n) @ H_n in x's dtype (`qfx::hadamard`); mix: `hadamard_rows.mix_factor(n)`."""
    from qfx.lowering.kernels.hadamard_rows import hadamard_rows

    return hadamard_rows(x, mix)


@kernel_hadamard.register_fake
def _(x, mix):
    return x.new_empty(x.shape)
