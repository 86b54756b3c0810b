"""`qfx::kernel_linear`: the op the backend lowers `qfx::quantized_linear` to on CUDA.

It holds the weight in a kernel layout (see `kernels.layout`), packed once at compile time,
and runs the Triton kernel chosen by `kernel`: "wint_a16" (weight-only), "act_quant"
(int8/fp8 activations quantized per token inside the GEMM) or "hadamard_act_quant" (the same
GEMM on x @ H_K, the online rotation `qfx::hadamard` that fed it, rotated and quantized in one
pass over x; `mix` is the rotation's factor, see `kernels.hadamard_rows`). Inductor keeps it as
an extern call; its fake implementation gives the output shape for tracing. With "act_quant"
and x already quantized (int8 / e4m3 codes from `qfx::quantize_rows`), `a_scale` holds their
row scales and `out_dtype` the dtype of y.

`qfx::quantize_rows` is the per-token activation quantizer on its own: (codes, row scales).
The backend hands Inductor its reference math, so that it is computed in the kernel Inductor
generates for the op producing x (a norm), see `lowering.quantize_in_producer`.

`qfx::kernel_hadamard` is `qfx::hadamard` on the Triton kernel, where no GEMM takes it in.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from qfx import primitives as P
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
    out_dtype: Any = None

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
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """y (..., N) = kernel(x (..., K)) with the weight held as `KernelWeight` fields."""
    kw = as_kernel_weight(data, scale, zero, bits, group, n, k)
    if kernel == "wint_a16":
        from qfx.lowering.kernels.wint_a16 import wint_a16_linear

        return wint_a16_linear(x, kw, bias)
    if kernel in ("act_quant", "hadamard_act_quant"):
        from qfx.lowering.kernels.act_quant_gemm import act_quant_linear

        return act_quant_linear(x, kw, a_scale, bias, hadamard=kernel == "hadamard_act_quant", mix=mix,
                                out_dtype=out_dtype)
    raise ValueError(f"kernel_linear: unknown kernel {kernel!r}; expected one of {KERNELS}")


@kernel_linear.register_fake
def _(x, data, scale, zero, bias, a_scale, kernel, bits, group, n, k, mix=None, out_dtype=None):
    torch._check(x.shape[-1] == k, lambda: f"kernel_linear: x has {x.shape[-1]} features, expected {k}")
    return x.new_empty((*x.shape[:-1], n), dtype=out_dtype or x.dtype)


def quantize_rows_ref(x: torch.Tensor, fp8: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`qfx::quantize_rows` in plain PyTorch: the per-token quantizer of
    `qfx.ops.fake_quantize_activation`, with the scales as (...) instead of (..., 1)."""
    q, scale = P.quantize_per_token_fp8(x) if fp8 else P.quantize_per_token(x, 8)
    return q, scale.squeeze(-1)


@torch.library.custom_op("qfx::quantize_rows", mutates_args=())
def quantize_rows(x: torch.Tensor, fp8: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., K) -> (codes (..., K) int8 or float8_e4m3fn, scales (...) float32), per token."""
    from qfx.lowering.kernels import interpreting
    from qfx.lowering.kernels.act_quant_gemm import quantize_rows as kernel

    if not (x.is_cuda or interpreting()):
        return quantize_rows_ref(x, fp8)
    q, s = kernel(x.reshape(-1, x.shape[-1]).contiguous(), fp8)
    return q.reshape(x.shape), s.reshape(x.shape[:-1])


@quantize_rows.register_fake
def _(x, fp8):
    return (x.new_empty(x.shape, dtype=torch.float8_e4m3fn if fp8 else torch.int8),
            x.new_empty(x.shape[:-1], dtype=torch.float32))


@torch.library.custom_op("qfx::kernel_hadamard", mutates_args=())
def kernel_hadamard(x: torch.Tensor, mix: torch.Tensor | None) -> torch.Tensor:
    """x (..., n) @ H_n in x's dtype (`qfx::hadamard`); mix: `hadamard_rows.mix_factor(n)`."""
    from qfx.lowering.kernels.hadamard_rows import hadamard_rows

    return hadamard_rows(x, mix)


@kernel_hadamard.register_fake
def _(x, mix):
    return x.new_empty(x.shape)
