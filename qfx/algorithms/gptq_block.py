"""GPTQ's inner loop over one lazy batch of columns, as one Triton kernel.

GPTQ (`qfx.algorithms.gptq`) quantizes a weight W (N, K) column by column; within a lazy batch
of `width` columns each column's rounding error is pushed onto the batch's later columns
through a row of the inverse-Hessian factor. Rows of W never interact, so one program owns
BLOCK_N rows and the whole batch (BLOCK_N, width) in registers, and walks its columns in order:
one launch per batch instead of about fifteen small PyTorch ops per column, each waiting on
the launch before it.

Per column i of the batch (original column `cols[i]`, group `cols[i] // group`):
    qparams   static: read (N, G) scale / zero; else at a group's first column, min-max of the
              group's current (error-updated) columns, written to scale / zero
    q         clamp(round(w_i / s) + z, 0, 2^bits - 1)    (z = 2^(bits-1) when symmetric)
    e         (w_i - (q - z) s) / hinv[i, i]
    update    w_j -= e hinv[i, j] for j > i
Outputs: codes (N, K) uint8 at the batch's columns, e (N, width) for the caller's update of
the columns after the batch, and the non-static groups' scale / zero. Non-static groups must
start at the batch's first column and not cross its end (the caller sizes batches to whole
groups). float32 only; `qfx.algorithms.gptq.gptq_block_ref` is the same loop in PyTorch (any
float dtype, no Triton needed), and the reference the kernel is tested against.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def gptq_block(w1: torch.Tensor, hinv1: torch.Tensor, cols: torch.Tensor, codes: torch.Tensor,
               scale: torch.Tensor, zero: torch.Tensor | None, bits: int, symmetric: bool, group: int,
               static: bool, clip_ratio: float, scale_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The batch's loop as one launch. w1 (N, width) float32, the batch's current columns (read
    only); hinv1 (width, width) float32; cols (width,) int64 on w1's device; codes (N, K) uint8;
    scale (N, G) float32; zero (N, G) uint8 or None; scale_dtype: on-the-fly scales rounded to
    nearest in bfloat16 / float16 (None: kept). Returns e (N, width) float32."""
    n, width = w1.shape
    if w1.dtype != torch.float32 or hinv1.dtype != torch.float32 or scale.dtype != torch.float32:
        raise TypeError("gptq_block runs in float32; use gptq_block_ref for other dtypes")
    if codes.stride(1) != 1 or scale.stride(1) != 1 or (zero is not None and zero.stride() != scale.stride()):
        raise ValueError("gptq_block writes codes, scale and zero in place: they must be row-major")
    w1, hinv1 = w1.contiguous(), hinv1.contiguous()
    err1 = torch.empty_like(w1)
    block_w = triton.next_power_of_2(width)
    block_n = max(1, min(16, 2048 // block_w))
    qmax = (1 << bits) - 1
    gptq_block_kernel[(triton.cdiv(n, block_n),)](
        w1, w1.stride(0), hinv1, hinv1.stride(0), cols, codes, codes.stride(0),
        scale, zero if zero is not None else scale, scale.stride(0), err1, err1.stride(0),
        n, width, group, float(clip_ratio), float(qmax), float(qmax), float(1 << (bits - 1)),
        SYMMETRIC=symmetric, STATIC=static, ROUND_SCALE=_ROUNDING[scale_dtype], BLOCK_N=block_n, BLOCK_W=block_w, num_warps=4,
    )
    return err1


_ROUNDING = {None: 0, torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@triton.jit
def gptq_block_kernel(
    w_ptr, stride_w, hinv_ptr, stride_h, cols_ptr, codes_ptr, stride_c,
    scale_ptr, zero_ptr, stride_s, err_ptr, stride_e,
    N, WIDTH, GROUP, clip_ratio, qmax, range_div, half,  # range_div: asymmetric qmax - qmin
    SYMMETRIC: tl.constexpr, STATIC: tl.constexpr, ROUND_SCALE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    j = tl.arange(0, BLOCK_W)
    j_ok = j < WIDTH
    w = tl.load(w_ptr + rows[:, None] * stride_w + j[None, :], mask=row_ok[:, None] & j_ok[None, :], other=0.0)
    s = tl.full([BLOCK_N], 1.0, tl.float32)
    z = tl.full([BLOCK_N], 0.0, tl.float32) + half
    for i in range(0, WIDTH):
        col = tl.load(cols_ptr + i)
        gi = col // GROUP
        if STATIC:
            s = tl.load(scale_ptr + rows * stride_s + gi, mask=row_ok, other=1.0)
            if not SYMMETRIC:
                z = tl.load(zero_ptr + rows * stride_s + gi, mask=row_ok, other=0).to(tl.float32)
        else:
            # a group's first column? (groups start at multiples of GROUP in column order)
            start = row_ok & ((tl.zeros([BLOCK_N], tl.int64) + col) % GROUP == 0)  # (BLOCK_N,)
            in_group = (j >= i) & (j < i + GROUP) & j_ok
            lo = tl.min(tl.where(in_group[None, :], w, float("inf")), axis=1) * clip_ratio
            hi = tl.max(tl.where(in_group[None, :], w, float("-inf")), axis=1) * clip_ratio
            lo = tl.minimum(lo, 0.0)
            hi = tl.maximum(hi, 0.0)
            if SYMMETRIC:
                # primitives.choose_qparams: neither end clipped, -lo at -half, hi at half - 1
                s_new = tl.maximum(tl.maximum(tl.math.div_rn(-lo, half), tl.math.div_rn(hi, half - 1.0)), 1e-12)
                s_new = _rounded(s_new, ROUND_SCALE)
                z_new = z
            else:
                s_new = _rounded(tl.maximum(tl.math.div_rn(hi - lo, range_div), 1e-12), ROUND_SCALE)
                z_new = (-tl.math.div_rn(lo, s_new) + 12582912.0) - 12582912.0
                z_new = tl.minimum(tl.maximum(z_new, 0.0), qmax)
                tl.store(zero_ptr + rows * stride_s + gi, z_new.to(tl.uint8), mask=start)
            tl.store(scale_ptr + rows * stride_s + gi, s_new, mask=start)
            s = tl.where(start, s_new, s)
            z = tl.where(start, z_new, z)
        w_i = tl.sum(tl.where((j == i)[None, :], w, 0.0), axis=1)
        # (v + 1.5 * 2^23) - 1.5 * 2^23 rounds float32 |v| < 2^22 half to even, like torch.round
        q = (tl.math.div_rn(w_i, s) + 12582912.0) - 12582912.0
        q = tl.minimum(tl.maximum(q + z, 0.0), qmax)
        tl.store(codes_ptr + rows * stride_c + col, q.to(tl.uint8), mask=row_ok)
        e = tl.math.div_rn(w_i - (q - z) * s, tl.load(hinv_ptr + i * stride_h + i))
        tl.store(err_ptr + rows * stride_e + i, e, mask=row_ok)
        h_i = tl.load(hinv_ptr + i * stride_h + j, mask=j_ok & (j > i), other=0.0)
        w = w - e[:, None] * h_i[None, :]


@triton.jit
def _rounded(s, ROUND_SCALE: tl.constexpr):
    """s > 0 rounded to nearest (even) in bfloat16 (1) or float16 (2), back in float32, at least
    the dtype's smallest normal value (`primitives._held_in`); 0: s."""
    if ROUND_SCALE == 1:  # on the bits, so that compiled and interpreted runs agree
        bits = s.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        s = tl.maximum(bits.to(tl.float32, bitcast=True), 1.1754943508222875e-38)
    elif ROUND_SCALE == 2:
        s = tl.maximum(s.to(tl.float16, fp_downcast_rounding="rtne").to(tl.float32), 6.103515625e-05)
    return s
