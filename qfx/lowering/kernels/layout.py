"""Weights re-laid out for the kernels, once, when a graph is compiled.

The checkpoint layout (`qfx.primitives.pack`: codes packed along K within each output row)
suits storage and export; the kernels read:

- "packed" (int weights): `data` int32 (ceil(K / per_word), N). Word r, column n holds the codes
  of rows k = r*per_word .. r*per_word + per_word - 1 of W^T, `container` bits each, lowest
  first; per_word = 32 // container, container = 2, 4 or 8 (3-bit codes sit in 4-bit
  containers, 5..7-bit in 8-bit ones). A (BLOCK_K, BLOCK_N) tile is BLOCK_K / per_word rows of
  N-contiguous words: coalesced loads, each word feeding per_word products.
- "rows" (int8 weights with int8 activations, and fp8): `data` (N, K) signed int8 codes
  (u - 128) or float8_e4m3fn, K contiguous, the operand order the tensor cores read directly.

Scales are (G, N) float32 and zero points (G, N) float32 (None when symmetric: the zero is then
2^(bits-1)); G = 1 for per-channel weights. `group` is the number of K elements per scale row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qfx import primitives as P


@dataclass(frozen=True)
class KernelWeight:
    layout: str  # "packed" | "rows"
    data: torch.Tensor
    scale: torch.Tensor  # (G, N) float32
    zero: torch.Tensor | None  # (G, N) float32
    bits: int  # code bits (8 for fp8)
    group: int  # K elements per scale row (K rounded up for per channel)
    n: int
    k: int

    @property
    def fp8(self) -> bool:
        return self.data.dtype == P.FP8_DTYPE

    @property
    def container(self) -> int:
        return container_bits(self.bits)


def container_bits(bits: int) -> int:
    """Bits each code occupies in a packed int32 word."""
    if not 1 <= bits <= 8:
        raise ValueError(f"kernel layouts hold 1..8-bit codes, got {bits}")
    return 2 if bits <= 2 else 4 if bits <= 4 else 8


def pack_words(codes: torch.Tensor, container: int) -> torch.Tensor:
    """Unsigned codes (N, K) -> int32 (ceil(K / per_word), N), K packed, lowest code first."""
    per_word = 32 // container
    n, k = codes.shape
    pad = (-k) % per_word
    c = torch.nn.functional.pad(codes.to(torch.int64), (0, pad)).T.reshape(-1, per_word, n)  # (K/pw, pw, N)
    shifts = (torch.arange(per_word, device=codes.device, dtype=torch.int64) * container).view(1, -1, 1)
    words = (c << shifts).sum(1)  # < 2^32
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()


def unpack_words(words: torch.Tensor, container: int, k: int) -> torch.Tensor:
    """Inverse of `pack_words`: int32 (ceil(K / per_word), N) -> codes (N, K) uint8."""
    per_word = 32 // container
    shifts = (torch.arange(per_word, device=words.device, dtype=torch.int64) * container).view(1, -1, 1)
    codes = (words.to(torch.int64).unsqueeze(1) >> shifts) & ((1 << container) - 1)  # (K/pw, pw, N)
    return codes.reshape(-1, words.shape[-1])[:k].T.to(torch.uint8).contiguous()


def kernel_weight(qweight, w_scale, w_zero, w_bits: int, group_size: int, in_features: int,
                  int8_rows: bool = False) -> KernelWeight:
    """The op's stored tensors -> the kernel layout. `int8_rows`: 8-bit codes as signed (N, K) int8."""
    n, k = qweight.shape[0], in_features
    group = group_size or k
    scale_t = w_scale.float().T.contiguous()  # (G, N)
    if qweight.dtype == P.FP8_DTYPE:
        return KernelWeight("rows", qweight.contiguous(), scale_t, None, 8, group, n, k)
    codes = P.unpack(qweight, w_bits, in_features)
    zero_t = None if w_zero is None else w_zero.float().T.contiguous()
    if int8_rows:
        if w_bits != 8 or w_zero is not None:
            raise ValueError("the int8 row layout holds symmetric 8-bit codes only")
        rows = (codes.to(torch.int16) - 128).to(torch.int8).contiguous()
        return KernelWeight("rows", rows, scale_t, None, 8, group, n, k)
    return KernelWeight("packed", pack_words(codes, container_bits(w_bits)), scale_t, zero_t, w_bits, group, n, k)


def dequantize_kernel_weight(kw: KernelWeight) -> torch.Tensor:
    """Float32 W (N, K) from a kernel layout: the reference the kernels are checked against."""
    scale = kw.scale.T.repeat_interleave(kw.group, dim=1)[:, : kw.k]  # (N, K)
    if kw.layout == "rows":  # fp8 values, or signed int8 codes u - 128
        return kw.data.float() * scale
    codes = unpack_words(kw.data, kw.container, kw.k)
    zero = (float(1 << (kw.bits - 1)) if kw.zero is None
            else kw.zero.T.repeat_interleave(kw.group, dim=1)[:, : kw.k])
    return (codes.float() - zero) * scale
