"""Pure quantization math, used by observers, passes, ops and kernel references alike.

Conventions (the GPTQ / compressed-tensors ones):
- Integer codes are stored unsigned, u in [0, 2^bits - 1].
- Asymmetric: w ~ (u - z) * s with an integer zero point z in the same range.
- Symmetric: w ~ (u - 2^(bits-1)) * s, i.e. signed q = u - 2^(bits-1) in [qmin, qmax] =
  [-2^(b-1), 2^(b-1)-1], with s = max(-min / -qmin, max / qmax): the smallest scale that puts
  both ends of the range on a code without clipping either (torchao's
  MappingType.SYMMETRIC_NO_CLIPPING_ERR). The other common rule, s = max|w| / ((qmax - qmin) / 2)
  (compressed-tensors, torchao's SYMMETRIC), clips a positive maximum to qmax / (qmax + 0.5) of
  itself, which made RTN's int4 g64 perplexity of SmolLM2-135M worse
  (benchmarks/results/rtn_scale_sensitivity_cpu.md).
  Dynamic per-token activations (`quantize_per_token`, and the kernels) keep
  s = max|x| / ((qmax - qmin) / 2).
- Groups run along the last (input-feature) dimension; a group size that does not divide it
  leaves a shorter last group. Ranges always include 0, so zero padding never changes them.
- Packing: `bits` in 2..8, along the last dimension, little-endian bit stream: every 8 codes
  become `bits` bytes. For 2, 4 and 8 bits this is the plain layout (byte = c0 | c1 << 4 ...).
"""

from __future__ import annotations

import math

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
_EPS = 1e-12


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Signed range (symmetric) or unsigned code range (asymmetric) for `bits`."""
    if symmetric:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def n_groups(in_features: int, group_size: int) -> int:
    return math.ceil(in_features / group_size)


def to_groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """(..., K) -> (..., G, group_size), zero-padding the last group when K % group_size != 0."""
    k = w.shape[-1]
    pad = n_groups(k, group_size) * group_size - k
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.reshape(*w.shape[:-1], -1, group_size)


def from_groups(wg: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of `to_groups`: (..., G, g) -> (..., K)."""
    return wg.reshape(*wg.shape[:-2], -1)[..., :in_features]


def choose_qparams(
    x_min: torch.Tensor, x_max: torch.Tensor, bits: int, symmetric: bool, scale_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (float32) and zero point (uint8, asymmetric only) from a range.

    The range is widened to contain 0. Symmetric: zero is None, and the scale is the smallest
    that neither clips x_max at qmax nor x_min at qmin (see the module docstring).
    scale_dtype: the scale rounded to nearest in this dtype (then the zero point from it).
    """
    x_min = torch.clamp(x_min.float(), max=0.0)
    x_max = torch.clamp(x_max.float(), min=0.0)
    qmin, qmax = qrange(bits, symmetric)
    if symmetric:
        scale = torch.clamp(torch.maximum(-x_min / -qmin, x_max / qmax), min=_EPS)
        return (scale if scale_dtype is None else _held_in(scale, scale_dtype)), None
    scale = torch.clamp((x_max - x_min) / (qmax - qmin), min=_EPS)
    if scale_dtype is not None:
        scale = _held_in(scale, scale_dtype)
    zero = torch.clamp(torch.round(qmin - x_min / scale), qmin, qmax).to(torch.uint8)
    return scale, zero


def _held_in(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Positive float32 scales rounded to nearest in `dtype`, at least its smallest normal value."""
    return torch.clamp(scale.to(dtype).float(), min=torch.finfo(dtype).tiny)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Float -> unsigned codes (uint8). `scale`/`zero` broadcast against `x`."""
    q = torch.round(x.float() / scale)
    if zero is None:
        half = 1 << (bits - 1)
        return (torch.clamp(q, -half, half - 1) + half).to(torch.uint8)
    return torch.clamp(q + zero.float(), 0, (1 << bits) - 1).to(torch.uint8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Unsigned codes -> float32: (u - z) * s, z = 2^(bits-1) when symmetric."""
    z = float(1 << (bits - 1)) if zero is None else zero.float()
    return (codes.float() - z) * scale


def weight_qparams(
    w: torch.Tensor, bits: int, symmetric: bool, group_size: int | None, clip_ratio: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Min-max qparams of a weight (N, K). group_size None = one group per row (per channel).

    Returns scale (N, G) float32 and zero (N, G) uint8 or None.
    """
    g = w.shape[-1] if group_size is None else group_size
    wg = to_groups(w.float(), g)
    return choose_qparams(wg.amin(-1) * clip_ratio, wg.amax(-1) * clip_ratio, bits, symmetric)


def _per_group(fn, x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
               group_size: int | None) -> torch.Tensor:
    """Apply elementwise `fn(x, scale, zero, bits)` with qparams (N, G) over groups of x (N, K)."""
    k = x.shape[-1]
    g = k if group_size is None else group_size
    zg = None if zero is None else zero.unsqueeze(-1)
    return from_groups(fn(to_groups(x, g), scale.unsqueeze(-1), zg, bits), k)


def quantize_weight(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, group_size: int | None
) -> torch.Tensor:
    """Weight (N, K) -> codes (N, K) uint8 with per-group qparams (N, G)."""
    return _per_group(quantize, w, scale, zero, bits, group_size)


def dequantize_weight(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, group_size: int | None
) -> torch.Tensor:
    """Codes (N, K) -> float32 weight (N, K)."""
    return _per_group(dequantize, codes, scale, zero, bits, group_size)


def fake_quantize_weight(
    w: torch.Tensor, bits: int, symmetric: bool, group_size: int | None, clip_ratio: float = 1.0
) -> torch.Tensor:
    """Quantize then dequantize a weight with min-max qparams (float32 result)."""
    scale, zero = weight_qparams(w, bits, symmetric, group_size, clip_ratio)
    return dequantize_weight(quantize_weight(w, scale, zero, bits, group_size), scale, zero, bits, group_size)


# -- activations ------------------------------------------------------------------------


def representable_scale(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
                        dtype: torch.dtype, importance: torch.Tensor | None = None, ulps: int = 2) -> torch.Tensor:
    """The scale of each group among the `dtype` values nearest `scale` that reconstructs it best.

    wg: weight groups (..., g); scale (..., 1) float32; zero (..., 1) uint8 or None (kept: it
    is a code). Candidates: the `ulps` values of `dtype` at or below the scale and the `ulps`
    above it; the winner minimises sum importance * (w - dq(w))^2 over the group (importance
    broadcast to wg, e.g. the inputs' energy; None = 1). Plain rounding to `dtype` is one of
    the candidates, so the error is never above it. Returns float32 scales that `dtype` holds
    exactly.
    """
    base = scale.to(dtype)
    below = torch.where(base.float() > scale, torch.nextafter(base, torch.zeros_like(base)), base)
    candidates = [below]
    for _ in range(ulps - 1):
        candidates.append(torch.nextafter(candidates[-1], torch.zeros_like(base)))
    up = torch.nextafter(below, torch.full_like(base, math.inf))
    candidates.append(up)
    for _ in range(ulps - 1):
        candidates.append(torch.nextafter(candidates[-1], torch.full_like(base, math.inf)))
    best = best_err = None
    for c in candidates:
        c = torch.clamp(c.float(), min=torch.finfo(dtype).tiny)
        err = (wg - dequantize(quantize(wg, c, zero, bits), c, zero, bits)) ** 2
        err = (err if importance is None else err * importance).sum(-1, keepdim=True)
        if best is None:
            best, best_err = c, err
        else:
            better = err < best_err
            best, best_err = torch.where(better, c, best), torch.where(better, err, best_err)
    return best


def quantize_per_token(x: torch.Tensor, bits: int, clip_ratio: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric dynamic per-token int quantization of x (..., K).

    clip_ratio: each row's range is clip_ratio * max|x| (QuaRot clips 4-bit activations at 0.9);
    values beyond it saturate. Returns signed codes (..., K) int8 and scales (..., 1) float32:
    x ~ q * s.
    """
    qmin, qmax = qrange(bits, True)
    amax = x.float().abs().amax(-1, keepdim=True)
    if clip_ratio != 1.0:
        amax = amax * clip_ratio
    scale = torch.clamp(amax / ((qmax - qmin) / 2), min=_EPS)
    q = torch.clamp(torch.round(x.float() / scale), qmin, qmax).to(torch.int8)
    return q, scale


def quantize_per_tensor_static(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric int quantization of x with a fixed scale; signed int8 codes."""
    qmin, qmax = qrange(bits, True)
    return torch.clamp(torch.round(x.float() / scale), qmin, qmax).to(torch.int8)


def fp8_quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale saturated to the e4m3 range and cast to float8_e4m3fn."""
    return torch.clamp(x.float() / scale, -FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    """Scale that maps |x| <= amax onto the e4m3 range."""
    return torch.clamp(amax.float() / FP8_MAX, min=_EPS)


def quantize_per_token_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token e4m3 quantization of x (..., K): codes (..., K) float8_e4m3fn and
    scales (..., 1) float32, x ~ q * s (the fp8 twin of `quantize_per_token`)."""
    scale = fp8_scale(x.float().abs().amax(-1, keepdim=True))
    return fp8_quantize(x, scale), scale


# -- packing ----------------------------------------------------------------------------


def packed_width(in_features: int, bits: int) -> int:
    """Bytes per row after packing `in_features` codes of `bits` bits."""
    return math.ceil(in_features / 8) * bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes (..., K) uint8 < 2^bits -> packed (..., ceil(K/8)*bits) uint8.

    Each run of 8 codes becomes one 8*bits-bit little-endian word split into `bits` bytes.
    """
    if codes.dtype != torch.uint8:
        raise TypeError(f"pack expects uint8 codes, got {codes.dtype}")
    k = codes.shape[-1]
    pad = (-k) % 8
    c = torch.nn.functional.pad(codes, (0, pad)).to(torch.int64).reshape(*codes.shape[:-1], -1, 8)
    shifts = torch.arange(8, device=codes.device, dtype=torch.int64) * bits
    word = (c << shifts).sum(-1, keepdim=True)  # (..., K/8, 1), < 2^(8*bits) <= 2^64
    byte_shifts = torch.arange(bits, device=codes.device, dtype=torch.int64) * 8
    out = (word >> byte_shifts) & 0xFF  # (..., K/8, bits)
    return out.to(torch.uint8).reshape(*codes.shape[:-1], -1)


def unpack(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of `pack`: (..., ceil(K/8)*bits) uint8 -> codes (..., K) uint8."""
    if bits in (2, 4, 8):  # whole codes per byte: shift and mask in uint8, no 64-bit words
        per_byte = 8 // bits
        shifts = torch.arange(per_byte, device=packed.device, dtype=torch.uint8) * bits
        codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
        return codes.reshape(*packed.shape[:-1], -1)[..., :in_features]
    p = packed.to(torch.int64).reshape(*packed.shape[:-1], -1, bits)
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    word = (p << byte_shifts).sum(-1, keepdim=True)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
    codes = (word >> shifts) & ((1 << bits) - 1)
    return codes.to(torch.uint8).reshape(*packed.shape[:-1], -1)[..., :in_features]


def quantize_kv_rows(x: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys or values (..., D) -> asymmetric int `bits` codes per row and group of `group_size`
    along D (0: one group per row), as a KV cache stores them.

    Returns codes (..., D) uint8, scale (..., G) float32, zero (..., G) uint8.
    """
    d = x.shape[-1]
    xg = to_groups(x.float(), group_size or d)  # (..., G, g); zero padding never widens a range
    scale, zero = choose_qparams(xg.amin(-1, keepdim=True), xg.amax(-1, keepdim=True), bits, False)
    return from_groups(quantize(xg, scale, zero, bits), d), scale.squeeze(-1), zero.squeeze(-1)


def dequantize_kv_rows(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int,
                       dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `quantize_kv_rows`: codes (..., D), scale / zero (..., G) -> (..., D) in `dtype`."""
    d = codes.shape[-1]
    groups = to_groups(codes, group_size or d)
    return from_groups(dequantize(groups, scale.unsqueeze(-1), zero.unsqueeze(-1), bits), d).to(dtype)
