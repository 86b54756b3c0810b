"""Online Hadamard rotation of rows (QuaRot's R3 and R4), alone or fused with per-token
activation quantization.

y = x @ H_n for each row x (n,), with H_n = M (x) H_p / sqrt(p) as in
`qfx.algorithms.hadamard.online_factors` (M: m x m orthogonal, none when m = 1; H_p Sylvester's
+-1 matrix, p a power of two). Sylvester's matrix splits as H_p = H_(p/C) (x) H_C, so with
C = min(p, 128) and L = M (x) H_(p/C) (R x R, R = n / C), viewing a row as X (R, C) row-major
gives y = L^T X H_C, times 1/sqrt(p): two tensor-core products on the row as it lies in memory,
with no transposes. When M is a Hadamard matrix, L is stored with entries +-1 (exact in any
dtype) and the 1/sqrt(m) joins the final scale.

Precision: X H_C runs on x's dtype (bf16 / fp16 values times +-1: exact products, float32
sums). L^T (X H_C), for bf16 x and a +-1 L, runs as two bf16 products, on the leading bf16 part
of X H_C and on the rest (about 16 bits in all, against bf16's 8 in the output); otherwise on
three TF32 products ("tf32x3", float32-accurate). A single TF32 product was too coarse: on an
H100, W8A8 GEMMs on activations rotated that way differed from the float32-rotated reference by
0.0045 relative (0.0009 without rotation), fp8 ones by up to 0.012, as more codes moved.

A program builds H_C and L^T once and loops over tiles. For R = 1 a tile is up to 128 x rows
(64 under TF32x3), one product 128 x C x C. For R > 1 it is one x row as an (RP, C) view (RP = R
rounded up to a power of two, at least 16), products RP x C x C and RP x RP x C: several x rows
per tile would need L^T repeated along a block diagonal, whose zero blocks cost tensor-core
products too (for 4096, 4 rows of 32 x 128 and a 128 x 128 L^T: slower than one row per tile
with the next tile prefetched, as measured in benchmarks/results/kernels.md). The launch (warps, pipeline stages, programs per
SM) is timed per size and M bucket from `candidates`, as the GEMMs' configs are.

When L = M (x) H_Q with an m x m factor M and Q = 2 or 4 (14336 = 28 x 4 x 128, 5120 =
20 x 2 x 128), the dense RQ x RQ left product is split: a row is Q blocks of m x C, each
multiplied by H_C, mixed across blocks by H_Q in float32 additions, then each multiplied by
M^T (`_hadamard_blocks_kernel`). For 14336 that is 192 multiply-adds per element instead of
384 (with the 112 rows padded to 128 and the 28 to 32).

It either stores the rotated rows in x's dtype (`hadamard_rows`) or rounds them to x's dtype (as the unfused graph does) and
quantizes each row as `act_quant_gemm.quantize_rows` does: int8 codes or e4m3 values and a
float32 scale per row (`hadamard_quantize_rows`), which the act-quant GEMM then reads instead
of x. Sizes with R > 128 (e.g. 11008 = 172 x 64; R > 64 under TF32x3) or p < 16 are not supported: `supported(n)`
says so and the graph keeps the reference op.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from qfx.lowering.kernels import interpreting, tuning
from qfx.lowering.kernels.tuning import Config
from qfx.lowering.kernels.quantize_tile import quantize_tile_fp8, quantize_tile_int8



@triton.jit
def sylvester(N: tl.constexpr):
    """Sylvester's Hadamard matrix (N x N, +-1, float32): H[i, j] = (-1)^popcount(i & j)."""
    v = tl.arange(0, N)[:, None] & tl.arange(0, N)[None, :]
    v = v ^ (v >> 8)
    v = v ^ (v >> 4)
    v = v ^ (v >> 2)
    v = v ^ (v >> 1)
    return 1.0 - 2.0 * (v & 1).to(tl.float32)


@triton.jit
def round_to_bf16_grid(v):
    """float32 v rounded half-to-even to bfloat16's grid, still float32. Used under the Triton
    interpreter only (EXACT_BF16_CAST), whose float32 -> bfloat16 cast truncates; GPUs round."""
    bits = v.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # -65536 = 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def right_product(x, h, EXACT_BF16_CAST: tl.constexpr):
    """x (rows, C) @ H_C in float32: bf16 / fp16 values times +-1 are exact products with float32
    sums; float32 rows run on TF32 x 3."""
    if x.dtype == tl.float32:
        return tl.dot(x, h, input_precision="tf32x3")
    elif EXACT_BF16_CAST:  # the interpreter: its products of bf16 tiles made in the kernel are unreliable
        return tl.dot(x.to(tl.float32), h)
    else:
        return tl.dot(x, h, out_dtype=tl.float32)


@triton.jit
def left_product(lt, t, SPLIT_BF16: tl.constexpr, EXACT_BF16_CAST: tl.constexpr):
    """L^T t for float32 t: two bf16 products (on t's leading bf16 part and on the rest) when L
    is +-1 and x bf16 (SPLIT_BF16), else TF32 x 3."""
    if SPLIT_BF16 and EXACT_BF16_CAST:  # the interpreter: the same sums, on float32 tiles
        t_hi = round_to_bf16_grid(t)
        return tl.dot(lt, t_hi) + tl.dot(lt, round_to_bf16_grid(t - t_hi))
    elif SPLIT_BF16:
        t_hi = t.to(tl.bfloat16)
        return tl.dot(lt, t_hi, out_dtype=tl.float32) + tl.dot(lt, (t - t_hi.to(tl.float32)).to(tl.bfloat16),
                                                              out_dtype=tl.float32)
    else:
        return tl.dot(lt, t, input_precision="tf32x3")


@triton.jit
def left_factor_tile(lt_ptr, R: tl.constexpr, RP: tl.constexpr, SPLIT_BF16: tl.constexpr,
                     EXACT_BF16_CAST: tl.constexpr):
    """L^T (R x R, float32, row-major) zero-padded to RP x RP, in the dtype `left_product` takes."""
    r = tl.arange(0, RP)
    lt = tl.load(lt_ptr + r[:, None] * R + r[None, :], mask=(r[:, None] < R) & (r[None, :] < R), other=0.0)
    if SPLIT_BF16 and not EXACT_BF16_CAST:
        lt = lt.to(tl.bfloat16)
    return lt


@triton.jit
def _hadamard_rows_kernel(x_ptr, lt_ptr, y_ptr, s_ptr, ROWS_TOTAL, stride_xm, stride_ym, out_scale,
                          R: tl.constexpr, RP: tl.constexpr, C: tl.constexpr, ROWS: tl.constexpr,
                          QUANT: tl.constexpr, FP8: tl.constexpr, SPLIT_BF16: tl.constexpr,
                          EXACT_FP8_CAST: tl.constexpr, EXACT_BF16_CAST: tl.constexpr):
    """x (ROWS_TOTAL, R C) -> rotated rows in x's dtype at y_ptr (QUANT false), or their codes at
    y_ptr and scales at s_ptr. lt_ptr: L^T (R x R, float32, row-major; unused when R = 1).
    SPLIT_BF16: L has entries +-1 and x is bf16, so L^T T runs as two bf16 products, on T's
    leading bf16 part and on the rest (about 16 bits of T in all); else on TF32 x 3.

    Each program builds H_C and the left factor once, then loops over tiles of ROWS rows of x:
    tile row t = row * RP + r holds row r of one x row's (R, C) view (zeros for r >= R); one x
    row per tile when R > 1."""
    tl.static_assert(R == 1 or ROWS == 1)
    t_rows = tl.arange(0, ROWS * RP)
    c = tl.arange(0, C)
    r = t_rows % RP
    h = sylvester(C)
    if x_ptr.dtype.element_ty != tl.float32 and not EXACT_BF16_CAST:
        h = h.to(x_ptr.dtype.element_ty)
    if R > 1:
        lt = left_factor_tile(lt_ptr, R, RP, SPLIT_BF16, EXACT_BF16_CAST)
    for tile in range(tl.program_id(0), tl.cdiv(ROWS_TOTAL, ROWS), tl.num_programs(0)):
        row = tile * ROWS + t_rows // RP
        offs = (r * C)[:, None] + c[None, :]
        ok = ((row < ROWS_TOTAL) & (r < R))[:, None] & (c < C)[None, :]
        x = tl.load(x_ptr + row[:, None] * stride_xm + offs, mask=ok, other=0.0)
        t = right_product(x, h, EXACT_BF16_CAST)
        if R > 1:
            t = left_product(lt, t, SPLIT_BF16, EXACT_BF16_CAST)
        t = rounded_output(t, out_scale, x_ptr.dtype.element_ty, EXACT_BF16_CAST)
        dst = y_ptr + row[:, None] * stride_ym + offs
        if QUANT:  # one scale per x row: the max over its RP tile rows
            amax = tl.max(tl.reshape(tl.max(tl.abs(t.to(tl.float32)), axis=1), (ROWS, RP)), axis=1)
            amax = tl.reshape(tl.broadcast_to(amax[:, None], (ROWS, RP)), (ROWS * RP,))
            scale = tl.maximum(tl.math.div_rn(amax, 448.0 if FP8 else 127.5), 1e-12)
            store_codes(dst, t, tl.math.div_rn(tl.full((ROWS * RP,), 1.0, tl.float32), scale), ok, FP8, EXACT_FP8_CAST)
            tl.store(s_ptr + row, scale, mask=(row < ROWS_TOTAL) & (r == 0))
        else:
            tl.store(dst, t, mask=ok)


@triton.jit
def rounded_output(t, out_scale, DTYPE: tl.constexpr, EXACT_BF16_CAST: tl.constexpr):
    """The float32 product times the output scale, rounded once to x's dtype."""
    t = t * out_scale
    if EXACT_BF16_CAST:
        t = round_to_bf16_grid(t)
    return t.to(DTYPE)


@triton.jit
def store_codes(dst, t, inv_scale, mask, FP8: tl.constexpr, EXACT_FP8_CAST: tl.constexpr):
    """Quantize the rotated tile t (rows, C) in x's dtype with 1 / scale per tile row; store the codes."""
    if FP8:
        tl.store(dst, quantize_tile_fp8(t.to(tl.float32), inv_scale, EXACT_FP8_CAST), mask=mask)
    else:
        tl.store(dst, quantize_tile_int8(t.to(tl.float32), inv_scale), mask=mask)


@triton.jit
def _hadamard_blocks_kernel(x_ptr, lt_ptr, y_ptr, s_ptr, ROWS_TOTAL, stride_xm, stride_ym, out_scale,
                            R: tl.constexpr, RP: tl.constexpr, C: tl.constexpr, Q: tl.constexpr,
                            QUANT: tl.constexpr, FP8: tl.constexpr, SPLIT_BF16: tl.constexpr,
                            EXACT_FP8_CAST: tl.constexpr, EXACT_BF16_CAST: tl.constexpr):
    """The same function as `_hadamard_rows_kernel` for L = M (x) H_Q with Q = 2 or 4 (`left_factor`):
    a row, n = R Q C, is Q blocks X_b (R, C), X_b[a, c] = x[(a Q + b) C + c], and block b' of the
    output is M^T (sum_b H_Q[b, b'] X_b H_C). So the left product is R x R (lt_ptr: M^T) on each
    block instead of RQ x RQ on the whole row, and the H_Q mix is float32 additions: for 14336
    (R = 28 padded to RP = 32, Q = 4, C = 128), 128 + 2 x 32 multiply-adds per element in place of
    128 + 2 x 128. One x row per tile."""
    tl.static_assert(Q == 2 or Q == 4)
    r = tl.arange(0, RP)
    c = tl.arange(0, C)
    h = sylvester(C)
    if x_ptr.dtype.element_ty != tl.float32 and not EXACT_BF16_CAST:
        h = h.to(x_ptr.dtype.element_ty)
    lt = left_factor_tile(lt_ptr, R, RP, SPLIT_BF16, EXACT_BF16_CAST)
    offs = (r * (Q * C))[:, None] + c[None, :]  # block 0 of the row; block b is C further
    ok = (r < R)[:, None] & (c < C)[None, :]
    for row in range(tl.program_id(0), ROWS_TOTAL, tl.num_programs(0)):
        src = x_ptr + row * stride_xm + offs
        t0 = right_product(tl.load(src, mask=ok, other=0.0), h, EXACT_BF16_CAST)
        t1 = right_product(tl.load(src + C, mask=ok, other=0.0), h, EXACT_BF16_CAST)
        if Q == 2:
            u0, u1 = t0 + t1, t0 - t1
        else:  # H_4 = H_2 (x) H_2: two butterfly stages
            t2 = right_product(tl.load(src + 2 * C, mask=ok, other=0.0), h, EXACT_BF16_CAST)
            t3 = right_product(tl.load(src + 3 * C, mask=ok, other=0.0), h, EXACT_BF16_CAST)
            t0, t1, t2, t3 = t0 + t1, t0 - t1, t2 + t3, t2 - t3
            u0, u1, u2, u3 = t0 + t2, t1 + t3, t0 - t2, t1 - t3
        dtype = x_ptr.dtype.element_ty
        y0 = rounded_output(left_product(lt, u0, SPLIT_BF16, EXACT_BF16_CAST), out_scale, dtype, EXACT_BF16_CAST)
        y1 = rounded_output(left_product(lt, u1, SPLIT_BF16, EXACT_BF16_CAST), out_scale, dtype, EXACT_BF16_CAST)
        amax = tl.maximum(tl.max(tl.abs(y0.to(tl.float32))), tl.max(tl.abs(y1.to(tl.float32))))
        if Q == 4:
            y2 = rounded_output(left_product(lt, u2, SPLIT_BF16, EXACT_BF16_CAST), out_scale, dtype, EXACT_BF16_CAST)
            y3 = rounded_output(left_product(lt, u3, SPLIT_BF16, EXACT_BF16_CAST), out_scale, dtype, EXACT_BF16_CAST)
            amax = tl.maximum(amax, tl.maximum(tl.max(tl.abs(y2.to(tl.float32))), tl.max(tl.abs(y3.to(tl.float32)))))
        dst = y_ptr + row * stride_ym + offs
        if QUANT:
            scale = tl.maximum(tl.math.div_rn(amax, 448.0 if FP8 else 127.5), 1e-12)
            inv = tl.math.div_rn(tl.full((RP,), 1.0, tl.float32), scale)
            store_codes(dst, y0, inv, ok, FP8, EXACT_FP8_CAST)
            store_codes(dst + C, y1, inv, ok, FP8, EXACT_FP8_CAST)
            if Q == 4:
                store_codes(dst + 2 * C, y2, inv, ok, FP8, EXACT_FP8_CAST)
                store_codes(dst + 3 * C, y3, inv, ok, FP8, EXACT_FP8_CAST)
            tl.store(s_ptr + row, scale)
        else:
            tl.store(dst, y0, mask=ok)
            tl.store(dst + C, y1, mask=ok)
            if Q == 4:
                tl.store(dst + 2 * C, y2, mask=ok)
                tl.store(dst + 3 * C, y3, mask=ok)


BUTTERFLY = (2, 4)  # Q of `_hadamard_blocks_kernel`


@functools.lru_cache(maxsize=None)
def left_factor(n: int) -> tuple[torch.Tensor | None, float, int, bool, int]:
    """(the left factor the kernel reads, transposed: R x R float32, None when R = 1; the output
    scale; C; whether its entries are +-1; Q) for rows of size n. The rotation is
    (L^T (x) H_C) times the scale, with L = this factor (x) H_Q (Sylvester's, +-1): Q = 1 for the
    dense left factor of `_hadamard_rows_kernel`, 2 or 4 for `_hadamard_blocks_kernel`."""
    from qfx.algorithms.hadamard import hadamard_matrix, online_factors

    m_mat, p = online_factors(n)
    c = min(p, 128)
    m = 1 if m_mat is None else m_mat.shape[0]
    scale, signs = 1.0 / math.sqrt(p), m_mat is None
    if m_mat is not None and torch.equal((m_mat * math.sqrt(m)).round().abs(), torch.ones(m, m, dtype=m_mat.dtype)):
        m_mat, scale, signs = (m_mat * math.sqrt(m)).round(), 1.0 / math.sqrt(n), True  # +-1: exact in every dtype
    if m_mat is not None and p // c in BUTTERFLY:
        return m_mat.T.contiguous().float(), scale, c, signs, p // c
    left = hadamard_matrix(p // c)
    if m_mat is not None:
        left = torch.kron(m_mat, left)
    return (None if left.shape[0] == 1 else left.T.contiguous().float()), scale, c, signs, 1


def mix_factor(n: int) -> torch.Tensor | None:
    """The factor tensor the kernel reads for rows of size n (L^T, or M^T for the block kernel;
    see the module docstring), or None when it needs none (n <= 128). Place it on x's device
    once, outside CUDA graphs."""
    return left_factor(n)[0]


def supported(n: int, dtype: torch.dtype = torch.bfloat16) -> tuple[bool, str]:
    """(whether rows of length n in `dtype` run here, the reason when not)."""
    from qfx.algorithms.hadamard import online_factors

    _, p = online_factors(n)
    if p < 16:
        return False, f"rotation of size {n}: its power-of-two factor {p} is below 16"
    lt, _, c, signs, _ = left_factor(n)
    r = 1 if lt is None else lt.shape[0]
    most = _tile_rows(dtype, signs)
    if triton.next_power_of_2(r) > most:
        return False, f"rotation of size {n}: its dense factor would be {r} x {r}, above {most} x {most} for {dtype}"
    return True, ""


def candidates(tile_elements: int) -> list[Config]:
    """Launch configs of the persistent kernel: warps, pipeline stages, and programs per SM (in
    `group_m`; the tile sizes are fixed by the rotation's size). The first is the untimed
    default. Each of the others was the fastest for some size on an H100 (8 warps, 3 stages and
    one program per SM for the long rows of K = 14336; 4 warps, 3 stages and 4 per SM for
    K = 4096)."""
    warps = 8 if tile_elements >= 8192 else 4
    return [Config(0, 0, 0, num_warps=w, num_stages=st, group_m=per_sm) for w, st, per_sm in
            [(warps, 2, 4), (8, 3, 1), (4, 3, 4), (4, 1, 2), (8, 3, 2)]]


def _launch(x2: torch.Tensor, lt: torch.Tensor | None, out: torch.Tensor, scale: torch.Tensor | None,
            fp8: bool = False) -> None:
    rows_total, n = x2.shape
    ok, why = supported(n, x2.dtype)
    if not ok:
        raise ValueError(f"hadamard_rows: {why}; keep the reference op `qfx.ops.hadamard_ref` for it")
    lt_host, out_scale, c, signs, q = left_factor(n)
    split_bf16 = signs and x2.dtype == torch.bfloat16
    r = 1 if lt_host is None else lt_host.shape[0]
    rp = 1 if r == 1 else max(16, triton.next_power_of_2(r))
    # R > 1: one x row per tile; else up to _tile_rows, and no more tile rows than x has
    rows = 1 if r > 1 else min(_tile_rows(x2.dtype, split_bf16), triton.next_power_of_2(rows_total))
    tiles = triton.cdiv(rows_total, rows)
    common = dict(QUANT=scale is not None, FP8=fp8, SPLIT_BF16=split_bf16, EXACT_FP8_CAST=fp8 and interpreting(),
                  EXACT_BF16_CAST=x2.dtype == torch.bfloat16 and interpreting())

    def run(cfg: Config) -> None:
        # the interpreter runs two programs, so that its tests take the loop over tiles too
        programs = min(tiles, 2 if interpreting() else cfg.group_m * _sm_count(x2.device))
        args = (x2, out if lt is None else lt, out, scale if scale is not None else out, rows_total, x2.stride(0),
                out.stride(0), out_scale)
        if q > 1:
            _hadamard_blocks_kernel[(programs,)](*args, R=r, RP=rp, C=c, Q=q, **common,
                                                 num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        else:
            _hadamard_rows_kernel[(programs,)](*args, R=r, RP=rp, C=c, ROWS=rows, **common,
                                               num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    key = f"hadamard_rows/{tuning.m_bucket(rows_total)}/{n}/{x2.dtype}/{out.dtype}"
    run(tuning.pick(key, candidates(rows * rp * c * q), run))


def _tile_rows(dtype: torch.dtype, split_bf16: bool = True) -> int:
    """Most rows per tile (x rows when R = 1; RP, the padded R, bounds R): 128 where the left product runs on bf16, else 64 (TF32x3
    operands take twice the shared memory)."""
    return 128 if dtype == torch.bfloat16 and split_bf16 else 64


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def hadamard_rows(x: torch.Tensor, mix: torch.Tensor | None) -> torch.Tensor:
    """x (..., n) @ H_n in x's dtype; `mix` is `mix_factor(n)` on x's device."""
    x2 = _rows(x)
    y = torch.empty(x2.shape, device=x.device, dtype=x.dtype)
    _launch(x2, mix, y, None)
    return y.reshape(x.shape)


def hadamard_quantize_rows(x2: torch.Tensor, mix: torch.Tensor | None, fp8: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x2 (M, n) -> (codes of x2 @ H_n rounded to x2's dtype, (M, n) int8 or e4m3; row scales (M,) float32)."""
    x2 = _rows(x2)
    q = torch.empty(x2.shape, device=x2.device, dtype=torch.float8_e4m3fn if fp8 else torch.int8)
    scale = torch.empty((x2.shape[0],), device=x2.device, dtype=torch.float32)
    _launch(x2, mix, q, scale, fp8)
    return q, scale
