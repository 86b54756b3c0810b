"""Weight-only quantized GEMM: y = x @ dequant(W)^T + bias with bf16/fp16 x.

W is int (2..8-bit codes, group-wise or per channel, symmetric or with zero points) in the
"packed" layout, or fp8 per channel in the "rows" layout (see `layout`). Each program owns a
(BLOCK_M, BLOCK_N) tile of y and walks K in BLOCK_K steps: load a tile of x, load the
BLOCK_K / per_word word rows of W, unpack to the integers u - z (exact in x's dtype),
tensor-core dot, and add the float32 product times the group's scale (BLOCK_K divides the
group, so one scale row per step). The weights are never rounded to x's dtype after scaling.
Unpacking is three operations a code: one shift that moves it to the top bits of a float's
mantissa, one mask-and-OR with the bits of 1.0 (the float 1 + u / B), and one fused
multiply-add to u - z (or (u - z) s). Small M is memory bound and has too few tiles to fill
the GPU, so those configs split K over `split_k` programs whose float32 partials the last of
them adds up (`split_k`).

Two more variants, picked by timing like any config:
- "gemv" (M = 1): no tensor cores; each program reads whole word rows of a K chunk (one group,
  so one scale and zero per column), multiplies the codes by x on the CUDA cores, and applies
  scale and zero once per chunk: sum_k x_k (u_k - z) s = s (sum_k x_k u_k - z sum_k x_k). Codes
  become floats by placing their bits in a mantissa, two codes per shift of the word (no
  conversion or subtraction per code).
- "dequant" (large M, compute bound): one pass writes W^T in x's dtype, then cuBLAS multiplies.
- "tiled-once": the tiled kernel loading each word of a tile once and shifting it per_word
  ways (a (rows, per_word, BLOCK_N) block reshaped to (BLOCK_K, BLOCK_N)), instead of
  loading it per_word times.
- "scaled" / "scaled-once": the tiled kernels with the scale applied to the weight tile before
  the dot, (u - z) s rounded to x's dtype as the reference rounds it (up to a rare one-unit
  difference, see the kernel), so every step's dot accumulates into the same float32 tile and
  the tensor-core products of successive steps can overlap (a dot whose result is scaled must
  finish before the next one starts).
- "swapped-<variant>": the same kernel computing y^T = W x^T, so that the unpacked weight tile
  is the tensor cores' first operand, which Hopper's wgmma reads from registers (the second
  operand, the x tile, is read from shared memory as loaded); the weight tile never goes
  through shared memory. Faster at M <= 256 on an H100 (benchmarks/results/kernels.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qfx.lowering.kernels import interpreting, split_k, tuning
from qfx.lowering.kernels.layout import KernelWeight, dequantize_kernel_weight
from qfx.lowering.kernels.split_k import store_tile
from qfx.lowering.kernels.tuning import Config


@triton.jit
def tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program, GROUP_M row tiles at a time so their W tiles stay in L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % width) % size_m, (pid % width) // size_m


@triton.jit
def code_at(words, slot, CONTAINER: tl.constexpr, POS: tl.constexpr):
    """The code in container `slot` of each word, moved to bits POS.. (other bits zero): one
    shift, left or right, and a mask."""
    at = slot * CONTAINER
    moved = (words << tl.maximum(POS - at, 0)) >> tl.maximum(at - POS, 0)
    return moved & (((1 << CONTAINER) - 1) << POS)


@triton.jit
def load_packed_codes(w_ptr, offs_k, offs_n, mask_k, mask_n, N, CONTAINER: tl.constexpr, POS: tl.constexpr = 0):
    """Unsigned codes (BLOCK_K, BLOCK_N) int32 from the packed layout (ceil(K/per_word), N), at
    bits POS.. of each value (u << POS)."""
    PER_WORD: tl.constexpr = 32 // CONTAINER
    words = tl.load(w_ptr + (offs_k // PER_WORD)[:, None] * N + offs_n[None, :],
                    mask=mask_k[:, None] & mask_n[None, :], other=0)
    return code_at(words, (offs_k % PER_WORD)[:, None], CONTAINER, POS)


@triton.jit
def load_packed_codes_once(w_ptr, k0, offs_n, mask_n, K, N, CONTAINER: tl.constexpr, BLOCK_K: tl.constexpr,
                           BLOCK_N: tl.constexpr, POS: tl.constexpr = 0):
    """The same (BLOCK_K, BLOCK_N) codes for K rows k0.. (k0 a multiple of per_word), each word
    loaded once and shifted per_word ways, instead of loaded per_word times."""
    PER_WORD: tl.constexpr = 32 // CONTAINER
    ROWS: tl.constexpr = BLOCK_K // PER_WORD
    rows = k0 // PER_WORD + tl.arange(0, ROWS)
    words = tl.load(w_ptr + rows[:, None] * N + offs_n[None, :],
                    mask=(rows < tl.cdiv(K, PER_WORD))[:, None] & mask_n[None, :], other=0)  # (ROWS, BLOCK_N)
    codes = code_at(words[:, None, :], tl.arange(0, PER_WORD)[None, :, None], CONTAINER, POS)  # (ROWS, PER_WORD, BLOCK_N)
    return tl.reshape(codes, (BLOCK_K, BLOCK_N))  # row r * PER_WORD + j is K row k0 + r * PER_WORD + j


@triton.jit
def codes_to_float(u):
    """Unsigned int32 codes (< 2^23) to float32 without a conversion instruction (which runs at a
    quarter of the FMA rate and bounded these kernels): 0x4B000000 | u is the float 2^23 + u."""
    return (u | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _wint_a16_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, part_ptr, cnt_ptr,
    M, N, K, GROUP, stride_xm, stride_ym, SPLIT_K, ONE_BITS,
    BITS: tl.constexpr, CONTAINER: tl.constexpr, W_FP8: tl.constexpr, HAS_ZERO: tl.constexpr,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, INTERPRET: tl.constexpr, UNPACK_ONCE: tl.constexpr,
    PRESCALE: tl.constexpr, SWAP_AB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    if SWAP_AB:  # y^T = W x^T: the unpacked weights are the tensor cores' first operand, held in registers
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        g = k0 // GROUP
        s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0)
        if W_FP8:  # rows layout (N, K); e4m3 values are exact in bf16 and fp16
            w = tl.load(w_ptr + offs_n[None, :] * K + offs_k[:, None],
                        mask=mask_k[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        else:
            # codes at bits POS..22, the top of a float's mantissa: the float 1 + u / B, B = 2^(23 - POS)
            POS: tl.constexpr = 16 if CONTAINER < 8 else 15
            if UNPACK_ONCE:
                codes = load_packed_codes_once(w_ptr, k0, offs_n, mask_n, K, N, CONTAINER, BLOCK_K, BLOCK_N, POS)
            else:
                codes = load_packed_codes(w_ptr, offs_k, offs_n, mask_k, mask_n, N, CONTAINER, POS)
            one_plus = (codes | ONE_BITS).to(tl.float32, bitcast=True)
            if HAS_ZERO:
                zero = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0.0)
            else:
                zero = (1 << (BITS - 1)) + tl.zeros((BLOCK_N,), dtype=tl.float32)
            # one fused multiply-add: (1 + u / B) B - (B + z) = u - z exactly (an integer below 2^8 in
            # magnitude, so exact in x's dtype), or with the scale folded in, (u - z) s rounded once:
            # B s is exact and (B + z) s is off by at most 2^-24 (B + z) s <= 2^-15 (u - z) s when u != z
            mul = tl.full((BLOCK_N,), 1 << (23 - POS), tl.float32)
            add = -((1 << (23 - POS)) + zero)
            if PRESCALE:
                mul, add = mul * s, add * s
            w = tl.fma(one_plus, mul[None, :], add[None, :])
        if PRESCALE:  # (u - z) s rounded to x's dtype, one accumulating dot per step
            if W_FP8:
                w = w * s[None, :]
            w = w.to(a.dtype)
            if INTERPRET:  # the interpreter's bf16 dot is wrong; float32 products of bf16 values are exact
                a, w = a.to(tl.float32), w.to(tl.float32)
                acc += tl.dot(tl.trans(w), tl.trans(a)) if SWAP_AB else tl.dot(a, w)
            elif SWAP_AB:
                acc = tl.dot(tl.trans(w), tl.trans(a), acc)
            else:
                acc = tl.dot(a, w, acc)
        else:
            # the step lies in one group (BLOCK_K divides it): its scale multiplies the step's dot
            w = w.to(a.dtype)
            if INTERPRET:
                a, w = a.to(tl.float32), w.to(tl.float32)
            if SWAP_AB:
                acc += tl.dot(tl.trans(w), tl.trans(a)) * s[:, None]
            else:
                acc += tl.dot(a, w) * s[None, :]
    if SWAP_AB:
        acc = tl.trans(acc)
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    store_tile(acc, y_ptr, offs_m, offs_n, mask_m, mask_n, stride_ym, part_ptr, cnt_ptr,
               pid_m * tl.cdiv(N, BLOCK_N) + pid_n, M, N, SPLIT_K, SPLIT)


@triton.jit
def shifted(words, SHIFT: tl.constexpr):
    """words << SHIFT, or >> -SHIFT (arithmetic: the sign copies land above any mask used here)."""
    if SHIFT >= 0:
        return words << SHIFT
    else:
        return words >> (-SHIFT)


@triton.jit
def as_float(bits, mask, magic: tl.constexpr):
    """The float32 whose bits are (bits & mask) | magic: a code placed in the mantissa of `magic`.
    `mask` is a runtime value so that the AND and the OR compile to one three-input instruction
    (an instruction takes one immediate; two constants would cost two)."""
    return ((bits & mask) | magic).to(tl.float32, bitcast=True)


@triton.jit
def _wint_gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, part_ptr, cnt_ptr, xs_ptr, N, K, GROUP, SPLIT_K, CODE_MASK,
    BITS: tl.constexpr, CONTAINER: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, ROW_SCALE: tl.constexpr,
    SPLIT: tl.constexpr, EVEN_K: tl.constexpr, X_PAIRS: tl.constexpr, CHUNK: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """y (1, N) for one row x: program (pid_n, pid_k) takes columns pid_n*BLOCK_N.. and every
    SPLIT_K-th BLOCK_K slice of K, in CHUNK-long pieces that lie in one group.

    Codes become floats without a conversion instruction, two per shift of the word: with c =
    CONTAINER, one shift puts code j = 2p + 1 at the top of the mantissa and code 2p just below
    it; masked and OR-ed with the bits of 1.0 and of 2^c they are f = 1 + u / 2^c and
    f = 2^c + u / 2^c. So with w_j = 1 or 2^c, sum_j x_j f_j = xw + xu / 2^c (xw = sum_j w_j x_j,
    xu = sum_j x_j u_j), and for a chunk with scale s and zero z, with xs = sum_j x_j:
    sum_j x_j (u_j - z) s = s (2^c (sum_j x_j f_j - xw) - z xs).
    Per word row and column, the sum over j is added into a (ROWS, BLOCK_N) accumulator, which
    is reduced over rows once at the end. CODE_MASK = (2^c - 1) << (23 - c), the top code's bits.
    EVEN_K: BLOCK_K divides K, so no load needs a bound on K. X_PAIRS: x is bf16 viewed as int32
    (K / 2 words), x_2p and x_2p+1 come in one load and become float32 by moving their bits.
    ROW_SCALE: x holds int8 codes whose scale is at xs_ptr; the sum is multiplied by it."""
    PER_WORD: tl.constexpr = 32 // CONTAINER
    ROWS: tl.constexpr = CHUNK // PER_WORD
    ONE: tl.constexpr = 0x3F800000  # bits of 1.0
    TWO_C: tl.constexpr = 0x3F800000 + (CONTAINER << 23)  # bits of 2^c
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_r = tl.arange(0, ROWS)
    n_rows = tl.cdiv(K, PER_WORD)
    mask_hi = CODE_MASK
    mask_lo = CODE_MASK >> CONTAINER
    acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
        for c in tl.static_range(BLOCK_K // CHUNK):
            kc = k0 + c * CHUNK
            rows = kc // PER_WORD + offs_r
            if EVEN_K:
                words = tl.load(w_ptr + rows[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0)
            else:
                words = tl.load(w_ptr + rows[:, None] * N + offs_n[None, :],
                                mask=(rows < n_rows)[:, None] & mask_n[None, :], other=0)
            xf = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
            xw = tl.zeros((ROWS,), dtype=tl.float32)
            xs = tl.zeros((ROWS,), dtype=tl.float32)
            for p in tl.static_range(PER_WORD // 2):
                t = shifted(words, 23 - 2 * CONTAINER * (p + 1))
                k_lo = kc + offs_r * PER_WORD + 2 * p
                if X_PAIRS:
                    if EVEN_K:
                        pair = tl.load(x_ptr + k_lo // 2)
                    else:
                        pair = tl.load(x_ptr + k_lo // 2, mask=k_lo < K, other=0)
                    x_lo = (pair << 16).to(tl.float32, bitcast=True)
                    x_hi = (pair & -65536).to(tl.float32, bitcast=True)
                elif EVEN_K:
                    x_lo = tl.load(x_ptr + k_lo).to(tl.float32)
                    x_hi = tl.load(x_ptr + k_lo + 1).to(tl.float32)
                else:
                    x_lo = tl.load(x_ptr + k_lo, mask=k_lo < K, other=0.0).to(tl.float32)
                    x_hi = tl.load(x_ptr + k_lo + 1, mask=k_lo + 1 < K, other=0.0).to(tl.float32)
                xf += x_hi[:, None] * as_float(t, mask_hi, ONE)
                xf += x_lo[:, None] * as_float(t, mask_lo, TWO_C)
                xw += x_hi + x_lo * (1 << CONTAINER)
                xs += x_hi + x_lo
            g = tl.minimum(kc, K - 1) // GROUP  # a chunk past K adds 0 (x is 0 there) but must read in bounds
            s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0)
            if HAS_ZERO:
                z = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0.0)
            else:
                z = (1 << (BITS - 1)) + tl.zeros((BLOCK_N,), dtype=tl.float32)
            acc += s[None, :] * ((xf - xw[:, None]) * (1 << CONTAINER) - z[None, :] * xs[:, None])
    out = tl.sum(acc, axis=0)
    if ROW_SCALE:
        out = out * tl.load(xs_ptr)
    if HAS_BIAS:
        if pid_k == 0:
            out += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    row = tl.arange(0, 1)  # y is one row: a (1, BLOCK_N) tile
    store_tile(out[None, :], y_ptr, row, offs_n, row < 1, mask_n, N, part_ptr, cnt_ptr, pid_n, 1, N, SPLIT_K, SPLIT)


@triton.jit
def _dequant_t_kernel(
    w_ptr, s_ptr, z_ptr, out_ptr, N, K, GROUP,
    BITS: tl.constexpr, CONTAINER: tl.constexpr, HAS_ZERO: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out (K, N) = W^T in out's dtype, from BLOCK_R word rows x BLOCK_N columns per program."""
    PER_WORD: tl.constexpr = 32 // CONTAINER
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    words = tl.load(w_ptr + rows[:, None] * N + offs_n[None, :],
                    mask=(rows < tl.cdiv(K, PER_WORD))[:, None] & mask_n[None, :], other=0)
    for j in tl.static_range(PER_WORD):
        k = rows * PER_WORD + j
        mask = (k < K)[:, None] & mask_n[None, :]
        sz = (k // GROUP)[:, None] * N + offs_n[None, :]
        w = codes_to_float((words >> (j * CONTAINER)) & ((1 << CONTAINER) - 1))
        if HAS_ZERO:
            w = w - tl.load(z_ptr + sz, mask=mask, other=0.0)
        else:
            w = w - (1 << (BITS - 1))
        w = w * tl.load(s_ptr + sz, mask=mask, other=0.0)
        tl.store(out_ptr + k[:, None] * N + offs_n[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


TILED = ("tiled", "tiled-once", "scaled", "scaled-once")  # variants of _wint_a16_kernel, each also "swapped-..."
TILED += tuple("swapped-" + v for v in TILED)


# gemv tiles that won on the 8B and 1B shapes on an H100; the split-K ones give N / BLOCK_N
# programs (fewer than an H100 has SMs) enough company
GEMV = [Config(1, n, bk, s, w, st, variant="gemv") for n, bk, s, w, st in
        [(64, 256, 8, 4, 3), (32, 512, 8, 2, 3), (64, 256, 16, 4, 2), (128, 1024, 4, 4, 2), (64, 512, 4, 4, 3),
         (256, 512, 2, 8, 3), (64, 1024, 1, 4, 2), (256, 256, 8, 8, 3), (64, 128, 8, 4, 3), (128, 256, 8, 4, 3),
         (128, 128, 16, 4, 2), (256, 256, 4, 8, 3), (64, 256, 4, 2, 3), (128, 256, 4, 4, 3)]]


def candidates(m: int, group: int, k: int) -> list[Config]:
    """Explicit configs by M bucket (H100-sized); BLOCK_K is cut to divide the group."""
    if m == 1:
        return GEMV + [Config(16, 64, 128, 1, 4, 4), Config(16, 64, 128, 4, 4, 4)]
    if m <= 16:
        cfgs = [Config(16, n, k, s, 4, st) for n, k, s, st in
                [(64, 128, 4, 4), (64, 128, 8, 4), (128, 64, 4, 5), (128, 128, 4, 4), (32, 128, 4, 4), (64, 256, 2, 4),
                 (128, 128, 1, 4), (32, 256, 4, 4), (128, 128, 8, 3), (64, 64, 8, 4), (128, 128, 8, 4)]]
    elif m <= 64:
        cfgs = [Config(bm, n, k, s, w, st) for bm, n, k, s, w, st in
                [(64, 64, 128, 2, 4, 4), (64, 128, 128, 1, 4, 3), (64, 128, 64, 1, 4, 4), (64, 64, 64, 2, 4, 5),
                 (32, 64, 128, 4, 4, 4), (64, 256, 64, 1, 8, 3), (16, 64, 256, 4, 4, 4), (64, 64, 128, 4, 4, 3),
                 (64, 128, 128, 8, 4, 3), (64, 128, 128, 2, 4, 3)]]
    elif m <= 256:
        cfgs = [Config(bm, n, k, s, w, st) for bm, n, k, s, w, st in
                [(128, 64, 128, 1, 4, 4), (256, 128, 64, 1, 8, 3), (128, 128, 64, 1, 4, 4), (128, 128, 128, 1, 8, 3),
                 (64, 128, 128, 1, 4, 3), (128, 64, 64, 2, 4, 4), (256, 64, 128, 2, 8, 3), (128, 64, 64, 2, 4, 3),
                 (256, 64, 64, 1, 4, 3)]]
    else:
        cfgs = [Config(bm, n, k, 1, w, st) for bm, n, k, w, st in
                [(128, 128, 64, 4, 4), (256, 128, 64, 8, 3), (128, 256, 128, 8, 3), (128, 128, 64, 8, 3)]]
    # Weights scaled before the dot, each word loaded once, came out fastest for M > 1 on an H100
    # (benchmarks/results/kernels.md); the same tiles scaling after the dot stay in the race.
    cfgs = [c._replace(variant=v) for v in ("scaled-once", "tiled-once") for c in cfgs]
    # y^T = W x^T tiles that won at M = 16, 64 and 256 on the 8B shapes on an H100 (the x tile is
    # the second operand of the dot, so BLOCK_M >= 16)
    if m <= 16:
        swapped = [(16, 128, 128, 8, 4, 3), (16, 64, 128, 4, 4, 3), (16, 64, 128, 8, 4, 3), (16, 128, 128, 4, 4, 3),
                   (16, 64, 128, 2, 4, 3), (16, 128, 128, 2, 4, 3), (16, 128, 64, 4, 4, 4)]
    elif m <= 64:
        swapped = [(64, 64, 128, 4, 4, 3), (64, 64, 128, 2, 4, 3), (64, 128, 128, 4, 8, 3), (64, 128, 128, 1, 4, 3),
                   (64, 64, 128, 2, 4, 4), (64, 128, 64, 2, 4, 5), (64, 128, 128, 2, 4, 4)]
    elif m <= 256:
        swapped = [(128, 64, 64, 2, 4, 3), (128, 64, 128, 2, 4, 3), (128, 64, 128, 1, 4, 3), (256, 128, 128, 1, 8, 3),
                   (128, 64, 128, 1, 4, 4), (128, 128, 64, 1, 8, 4), (64, 128, 128, 1, 4, 4), (256, 64, 64, 1, 4, 4)]
    else:  # the tiled kernels lose to "dequant" there
        swapped = []
    cfgs += [Config(bm, n, k, s, w, st, variant="swapped-scaled-once") for bm, n, k, s, w, st in swapped]
    if m > 64:  # compute bound: one pass writes W^T in x's dtype, then cuBLAS
        cfgs += [Config(16, 128, 0, variant="dequant"), Config(32, 64, 0, variant="dequant")]
    return [fit_block_k(c, group, k) for c in cfgs]


def gemv_chunk(cfg: Config, group: int, k: int) -> int:
    """K elements per scale lookup in the gemv kernel: a power of two inside one group."""
    chunk = cfg.block_k if group >= k else group & -group  # per channel: any; else the group's 2-power part
    return max(min(chunk, cfg.block_k), 8)


def fit_block_k(cfg: Config, group: int, k: int) -> Config:
    """Halve BLOCK_K until it divides the group (one scale row per K step); at least 16."""
    if group >= k:  # per channel
        return cfg
    bk = cfg.block_k
    if cfg.variant in ("gemv", "dequant"):  # no K steps over groups
        return cfg
    while group % bk and bk > 16:
        bk //= 2
    return cfg._replace(block_k=bk)


def supported(kw: KernelWeight) -> bool:
    """Shapes this kernel computes: groups that are a multiple of 16 (or per channel)."""
    return kw.group >= kw.k or kw.group % 16 == 0


def launch(x2: torch.Tensor, kw: KernelWeight, bias: torch.Tensor | None, cfg: Config) -> torch.Tensor:
    """y (M, N) for x2 (M, K) contiguous rows, with the given config."""
    cfg = fit_block_k(cfg, kw.group, kw.k)
    m = x2.shape[0]
    group = kw.group if kw.group < kw.k else 1 << 30  # per channel: one scale row
    if cfg.variant == "dequant" and not kw.fp8:
        w_t = torch.empty((kw.k, kw.n), device=x2.device, dtype=x2.dtype)
        grid = (triton.cdiv(triton.cdiv(kw.k, 32 // kw.container), cfg.block_m), triton.cdiv(kw.n, cfg.block_n))
        _dequant_t_kernel[grid](kw.data, kw.scale, kw.zero, w_t, kw.n, kw.k, group, BITS=kw.bits,
                                CONTAINER=kw.container, HAS_ZERO=kw.zero is not None, BLOCK_R=cfg.block_m,
                                BLOCK_N=cfg.block_n)
        y = x2 @ w_t
        return y if bias is None else y + bias
    if cfg.variant == "gemv" and m == 1 and not kw.fp8:
        return launch_gemv(x2, kw, bias, cfg)
    if cfg.variant not in TILED:  # a variant that does not apply here (e.g. gemv for M > 1)
        cfg = fit_block_k(Config(16 if m <= 16 else 64, 64, 64), kw.group, kw.k)
    cfg = fit_split(cfg, m, kw.n)
    y = torch.empty((m, kw.n), device=x2.device, dtype=x2.dtype)
    part = split_k.workspace(cfg.split_k, m, kw.n, x2.device) if cfg.split_k > 1 else y
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(kw.n, cfg.block_n), cfg.split_k)
    _wint_a16_kernel[grid](
        x2, kw.data, kw.scale, kw.zero, bias, y, part, split_k.counters(x2.device),
        m, kw.n, kw.k, group, x2.stride(0), y.stride(0), cfg.split_k,
        0x3F800000,  # the bits of 1.0, as an argument: in a register, OR and mask fuse into one op
        BITS=kw.bits, CONTAINER=kw.container if not kw.fp8 else 8, W_FP8=kw.fp8, HAS_ZERO=kw.zero is not None,
        HAS_BIAS=bias is not None, SPLIT=cfg.split_k > 1, INTERPRET=interpreting(),
        UNPACK_ONCE=cfg.variant.endswith("-once") and not kw.fp8, PRESCALE="scaled" in cfg.variant,
        SWAP_AB=cfg.variant.startswith("swapped-"),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return y


def launch_gemv(x2: torch.Tensor, kw: KernelWeight, bias: torch.Tensor | None, cfg: Config,
                row_scale: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """y (1, N) for one row x2 (1, K) on the "gemv" kernel; with `row_scale` (one float32), x2
    holds int8 codes and y = row_scale * (codes @ dequant(W)^T) + bias, in `out_dtype`."""
    group = kw.group if kw.group < kw.k else 1 << 30
    cfg = fit_split(cfg, 1, kw.n)
    y = torch.empty((1, kw.n), device=x2.device, dtype=out_dtype or x2.dtype)
    part = split_k.workspace(cfg.split_k, 1, kw.n, x2.device) if cfg.split_k > 1 else y
    grid = (triton.cdiv(kw.n, cfg.block_n), cfg.split_k)
    x_pairs = x2.dtype == torch.bfloat16 and kw.k % 2 == 0 and x2.data_ptr() % 4 == 0
    _wint_gemv_kernel[grid](
        x2.view(torch.int32) if x_pairs else x2, kw.data, kw.scale, kw.zero, bias, y, part,
        split_k.counters(x2.device), row_scale, kw.n, kw.k, group, cfg.split_k,
        ((1 << kw.container) - 1) << (23 - kw.container), BITS=kw.bits, CONTAINER=kw.container,
        HAS_ZERO=kw.zero is not None, HAS_BIAS=bias is not None, ROW_SCALE=row_scale is not None,
        SPLIT=cfg.split_k > 1, EVEN_K=kw.k % cfg.block_k == 0, X_PAIRS=x_pairs, CHUNK=gemv_chunk(cfg, kw.group, kw.k),
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y


def fit_split(cfg: Config, m: int, n: int) -> Config:
    """No split when the output has more tiles than there are split-K counters."""
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    return cfg._replace(split_k=1) if tiles > split_k.MAX_TILES else cfg


def wint_a16_linear(x: torch.Tensor, kw: KernelWeight, bias: torch.Tensor | None = None,
                    config: Config | None = None) -> torch.Tensor:
    """x (..., K) bf16/fp16 -> (..., N) in x's dtype."""
    x2 = x.reshape(-1, kw.k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if config is None:
        m = x2.shape[0]
        key = f"wint_a16/{tuning.m_bucket(m)}/{kw.n}/{kw.k}/{kw.bits}/{kw.group}/{kw.zero is not None}/{x.dtype}"
        config = tuning.pick(key, candidates(m, kw.group, kw.k), lambda c: launch(x2, kw, bias, c))
    return launch(x2, kw, bias, config).reshape(*x.shape[:-1], kw.n)


def wint_a16_ref(x: torch.Tensor, kw: KernelWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The op's function in plain PyTorch: dequantize (float32), round to x's dtype, matmul. The
    kernels apply scales after the integer products and so round less; they agree with this to
    float32 accumulation order and one bf16/fp16 rounding of each weight."""
    w = dequantize_kernel_weight(kw).to(x.dtype)
    return (x.float() @ w.float().T + (0 if bias is None else bias.float())).to(x.dtype)
