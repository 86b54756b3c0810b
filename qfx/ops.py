"""qfx custom ops (torch.library): the quantized linear that converted graphs call.

Each op has a reference implementation in plain PyTorch (runs on any device, is what the
CPU executes and what kernels are tested against) and a fake implementation so graphs
holding it trace, compile and export.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch.utils.weak import WeakIdKeyDictionary

from qfx import primitives as P

# Activation bits value meaning "activations are not quantized".
NO_ACT_QUANT = 16


class QuantizedLinearArgs(NamedTuple):
    """The arguments of a `qfx::quantized_linear` call by name (graph nodes or constants), in
    the op's order: read a node with `QuantizedLinearArgs.of(node)`, build one with
    `call_function(op, tuple(QuantizedLinearArgs(...)))`."""

    x: Any
    qweight: Any
    w_scale: Any
    w_zero: Any
    bias: Any
    w_bits: int
    group_size: int
    in_features: int
    a_bits: int
    a_scale: Any
    a_clip: float = 1.0

    @classmethod
    def of(cls, node) -> "QuantizedLinearArgs":
        return cls(*node.args, **node.kwargs)


@torch.library.custom_op("qfx::quantized_linear", mutates_args=())
def quantized_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    w_scale: torch.Tensor,
    w_zero: torch.Tensor | None,
    bias: torch.Tensor | None,
    w_bits: int,
    group_size: int,
    in_features: int,
    a_bits: int,
    a_scale: torch.Tensor | None,
    a_clip: float = 1.0,
) -> torch.Tensor:
    """y = act_quant(x) @ dequant(W)^T + bias, in x's dtype.

    x: (..., K) float. qweight: (N, ceil(K/8)*w_bits) uint8 packed codes (`P.pack`), or
    (N, K) float8_e4m3fn. w_scale: (N, G) with G = ceil(K/group_size) (group_size 0: G = 1,
    per channel). w_zero: (N, G) uint8 zero points, None when symmetric. a_bits: 16 for no
    activation quantization; otherwise symmetric int (or fp8 when qweight is fp8), per
    token when a_scale is None, else with the static per-tensor scale a_scale (scalar).
    a_clip: per-token int activations use a_clip * max|x| of each row as its range (1.0: no
    clipping); static scales already hold their clip ratio.
    """
    return quantized_linear_ref(x, qweight, w_scale, w_zero, bias, w_bits, group_size, in_features, a_bits, a_scale,
                                a_clip)


@quantized_linear.register_fake
def _(x, qweight, w_scale, w_zero, bias, w_bits, group_size, in_features, a_bits, a_scale, a_clip=1.0):
    torch._check(x.shape[-1] == in_features, lambda: f"quantized_linear: x has {x.shape[-1]} features, expected {in_features}")
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def dequantize_packed(qweight, w_scale, w_zero, w_bits: int, group_size: int, in_features: int) -> torch.Tensor:
    """Float32 weight (N, K) from the op's stored form."""
    if qweight.dtype == P.FP8_DTYPE:
        return qweight.float() * w_scale.float()
    codes = P.unpack(qweight, w_bits, in_features)
    return P.dequantize_weight(codes, w_scale.float(), w_zero, w_bits, group_size or None)


def fake_quantize_activation(x: torch.Tensor, a_bits: int, a_scale: torch.Tensor | None, fp8: bool,
                             clip_ratio: float = 1.0) -> torch.Tensor:
    """The activation values the quantized matmul sees, as float32. clip_ratio: per-token int only."""
    if fp8:
        if a_scale is None:
            q, scale = P.quantize_per_token_fp8(x)
        else:
            scale = a_scale.float()
            q = P.fp8_quantize(x, scale)
        return q.float() * scale
    if a_scale is None:
        q, scale = P.quantize_per_token(x, a_bits, clip_ratio)
        return q.float() * scale
    return P.quantize_per_tensor_static(x, a_scale.float(), a_bits).float() * a_scale.float()


# CPU weights unpacked once per stored weight: qweight -> (key, value). Entries go with their
# qweight; a key that no longer matches (other scales or zero points, or an in-place change to
# any of them) makes the entry stale.
_DEQUANTIZED: WeakIdKeyDictionary = WeakIdKeyDictionary()  # float weight (N, K)
_DEQUANTIZED_INT: WeakIdKeyDictionary = WeakIdKeyDictionary()  # signed int8 codes (K, N)


def _cached(store: WeakIdKeyDictionary, qweight: torch.Tensor, key: tuple, build):
    """`build()`, kept in `store` for CPU tensors outside tracing and autograd while `key` holds
    (tensors in it compared by identity, other items by value).

    Unpacking costs more than the matmul on the CPU, and the stored tensors of a converted
    model do not change between calls, so eager CPU evaluation reuses what it unpacked.
    """
    if (qweight.device.type != "cpu" or torch.compiler.is_compiling() or torch.is_grad_enabled()
            or isinstance(qweight, torch._subclasses.FakeTensor)):
        return build()
    hit = store.get(qweight)
    if hit is not None and all(a is b if isinstance(a, torch.Tensor) else a == b for a, b in zip(hit[0], key)):
        return hit[1]
    value = build()
    store[qweight] = (key, value)
    return value


def _weight(qweight, w_scale, w_zero, w_bits, group_size, in_features, dtype) -> torch.Tensor:
    """dequantize_packed(...).to(dtype), cached (see `_cached`)."""
    key = (dtype, qweight._version, w_scale, w_scale._version, w_zero, None if w_zero is None else w_zero._version)
    return _cached(_DEQUANTIZED, qweight, key,
                   lambda: dequantize_packed(qweight, w_scale, w_zero, w_bits, group_size, in_features).to(dtype))


def _int_path(qweight, w_zero, w_bits, group_size, a_bits) -> bool:
    """Symmetric per-channel int weights with int activations on the CPU: an exact int32 GEMM."""
    return (qweight.device.type == "cpu" and qweight.dtype == torch.uint8 and w_zero is None and group_size == 0
            and w_bits <= 8 and a_bits <= 8)


def _int_linear(x, qweight, w_scale, bias, w_bits, in_features, a_bits, a_scale, a_clip):
    """(q_x @ q_w^T) * s_x * s_w with the integer product exact (int32), as int8 tensor cores do.

    q_x: per-token (..., K) or static int codes; q_w: signed codes (N, K); s_w: (N, 1).
    """
    def signed_codes_t() -> torch.Tensor:  # (K, N)
        signed = (P.unpack(qweight, w_bits, in_features).to(torch.int16) - (1 << (w_bits - 1))).to(torch.int8)
        return signed.T.contiguous()

    codes_t = _cached(_DEQUANTIZED_INT, qweight, (qweight._version,), signed_codes_t)
    if a_scale is None:
        qx, sx = P.quantize_per_token(x, a_bits, a_clip)
    else:
        qx, sx = P.quantize_per_tensor_static(x, a_scale.float(), a_bits), a_scale.float()
    acc = torch._int_mm(qx.reshape(-1, in_features), codes_t).reshape(*x.shape[:-1], -1)
    y = acc.float() * sx * w_scale.float().reshape(-1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def quantized_linear_ref(x, qweight, w_scale, w_zero, bias, w_bits, group_size, in_features, a_bits, a_scale,
                         a_clip=1.0):
    """Plain-PyTorch reference for `qfx::quantized_linear` (see its docstring)."""
    if a_bits == NO_ACT_QUANT:
        return torch.nn.functional.linear(x, _weight(qweight, w_scale, w_zero, w_bits, group_size, in_features, x.dtype),
                                          bias)
    if _int_path(qweight, w_zero, w_bits, group_size, a_bits):
        return _int_linear(x, qweight, w_scale, bias, w_bits, in_features, a_bits, a_scale, a_clip)
    w = _weight(qweight, w_scale, w_zero, w_bits, group_size, in_features, torch.float32)
    xq = fake_quantize_activation(x, a_bits, a_scale, fp8=qweight.dtype == P.FP8_DTYPE, clip_ratio=a_clip)
    y = xq @ w.T  # float32 accumulation, as integer/fp8 GEMMs accumulate exactly or in fp32
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


@torch.library.custom_op("qfx::hadamard", mutates_args=())
def hadamard(x: torch.Tensor) -> torch.Tensor:
    """x @ H over the last dim: the online rotation of rotated graphs (QuaRot's R3 and R4).

    x: (..., n). H (n x n) is the fixed orthogonal matrix of `qfx.algorithms.hadamard.
    hadamard_transform` (normalised Hadamard, or Hadamard x a seeded orthogonal factor).
    """
    return hadamard_ref(x)


@hadamard.register_fake
def _(x):
    return x.new_empty(x.shape)  # contiguous, as the implementation returns


def hadamard_ref(x: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch reference for `qfx::hadamard`."""
    from qfx.algorithms.hadamard import hadamard_transform

    return hadamard_transform(x).contiguous()


def _hadamard_backward(ctx, grad):
    from qfx.algorithms.hadamard import hadamard_transform

    return hadamard_transform(grad, transpose=True)  # y = x H, so dL/dx = dL/dy H^T


hadamard.register_autograd(_hadamard_backward)


@torch.library.custom_op("qfx::quantize_kv", mutates_args=())
def quantize_kv(x: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """The values a quantized KV cache gives back: asymmetric int `bits` per token and head,
    in groups of `group_size` along the head dim (0: one group per head).

    x: (B, H, S, head_dim) keys or values as attention reads them; returns x's shape and dtype.
    """
    return quantize_kv_ref(x, bits, group_size)


@quantize_kv.register_fake
def _(x, bits, group_size):
    return x.new_empty(x.shape)  # contiguous, as the implementation returns


def quantize_kv_ref(x: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Plain-PyTorch reference for `qfx::quantize_kv`."""
    codes, scale, zero = P.quantize_kv_rows(x, bits, group_size)
    return P.dequantize_kv_rows(codes, scale, zero, bits, group_size, x.dtype).contiguous()


def _quantize_kv_backward(ctx, grad):
    return grad, None, None  # straight-through: rounding is treated as the identity (SpinQuant trains through it)


quantize_kv.register_autograd(_quantize_kv_backward)
