"""Online Hadamard rotation of rows (QuaRot's R3 and R4), alone or fused with per-token
activation quantization.

y = x @ H_n for each row x (n,), with H_n = M (x) H_p / sqrt(p) as in
`qfx.algorithms.hadamard.online_factors` (M: m x m orthogonal, None when m = 1; p a power of
two). Viewing a row as X (m, p), X[a, b] = x[a p + b], the rotated row is M^T X H_p / sqrt(p).
H_p is Sylvester's +-1 matrix, H_p = H_p1 (x) H_p2, so X H_p is two small products: over the
last axis of X viewed as (m p1, p2), then over the p1 axis. All three products (H_p2, H_p1, M^T)
run on tensor cores at float32 accuracy ("tf32x3": three TF32 products per float32 one): for a
Llama-3-8B down projection (n = 14336 = 28 x 512) that is 16 + 32 + 28 multiply-adds per
element, instead of the n of a dense rotation.

One program holds ROWS rows (one when m > 1), each padded to MP x p (MP = m rounded up to a
power of two, at least 16 because tensor-core products need 16 rows), in registers. It either
stores the rotated rows in x's dtype (`hadamard_rows`) or rounds them to x's dtype (as the
unfused graph does) and quantizes each row as `act_quant_gemm.quantize_rows` does: int8 codes
or e4m3 values and a float32 scale per row (`hadamard_quantize_rows`), which the act-quant GEMM
then reads instead of x. Rows too long for registers (MP p > 32768), factors m > 64 and p < 16
are not supported: `supported(n)` says so and the graph keeps the reference op.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from qfx.lowering.kernels import interpreting
from qfx.lowering.kernels.act_quant_gemm import quantize_tile_fp8, quantize_tile_int8

MAX_ROW_TILE = 32768  # MP * p elements held in registers by one program
MAX_M = 64


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
    interpreter only, whose float32 -> bfloat16 cast truncates; GPUs round."""
    bits = v.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # -65536 = 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _hadamard_rows_kernel(x_ptr, mix_ptr, y_ptr, s_ptr, R, stride_xm, stride_ym, inv_sqrt_p,
                          M_FACT: tl.constexpr, MP: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr,
                          ROWS: tl.constexpr, QUANT: tl.constexpr, FP8: tl.constexpr,
                          EXACT_FP8_CAST: tl.constexpr, EXACT_BF16_CAST: tl.constexpr):
    """x (R, m p1 p2) -> y = rotated x in x's dtype (QUANT false) or codes with scales at s_ptr."""
    P: tl.constexpr = P1 * P2
    row0 = tl.program_id(0) * ROWS
    # rows of the first view: (row, a, i) -> r = (row * MP + a) * P1 + i; column j
    r = tl.arange(0, ROWS * MP * P1)
    j = tl.arange(0, P2)
    row = row0 + r // (MP * P1)
    a = (r // P1) % MP
    src = row[:, None] * stride_xm + (a * P + (r % P1) * P2)[:, None] + j[None, :]
    ok = ((row < R) & (a < M_FACT))[:, None] & (j < P2)[None, :]
    x = tl.load(x_ptr + src, mask=ok, other=0.0).to(tl.float32)
    t = tl.dot(x, sylvester(P2), input_precision="tf32x3")  # (ROWS MP P1, P2): over j
    if P1 > 1:  # over i: bring it last, (row, a, j) x i
        t = tl.permute(tl.reshape(t, (ROWS * MP, P1, P2)), (0, 2, 1))
        t = tl.dot(tl.reshape(t, (ROWS * MP * P2, P1)), sylvester(P1), input_precision="tf32x3")
    t = tl.reshape(t, (ROWS * MP, P))  # column c = j * P1 + i, i.e. element a * P + i * P2 + j
    if M_FACT > 1:  # ROWS == 1: left-multiply by M^T (padded with zeros to MP x MP)
        ia = tl.arange(0, MP)
        mix_t = tl.load(mix_ptr + ia[None, :] * M_FACT + ia[:, None],
                        mask=(ia[:, None] < M_FACT) & (ia[None, :] < M_FACT), other=0.0)
        t = tl.dot(mix_t, t, input_precision="tf32x3")
    t = tl.reshape(t * inv_sqrt_p, (ROWS, MP * P))
    c = tl.arange(0, MP * P)
    dst_col = (c // P) * P + (c % P1) * P2 + (c % P) // P1
    rows = row0 + tl.arange(0, ROWS)
    ok = (rows < R)[:, None] & (c // P < M_FACT)[None, :]
    if EXACT_BF16_CAST:
        t = round_to_bf16_grid(t)
    t = t.to(x_ptr.dtype.element_ty)
    if QUANT:
        v = t.to(tl.float32)
        amax = tl.max(tl.abs(v), axis=1)
        scale = tl.maximum(tl.math.div_rn(amax, 448.0 if FP8 else 127.5), 1e-12)
        inv = tl.math.div_rn(tl.full((ROWS,), 1.0, tl.float32), scale)
        if FP8:
            q = quantize_tile_fp8(v, inv, EXACT_FP8_CAST)
        else:
            q = quantize_tile_int8(v, inv)
        tl.store(y_ptr + rows[:, None] * stride_ym + dst_col[None, :], q, mask=ok)
        tl.store(s_ptr + rows, scale, mask=rows < R)
    else:
        tl.store(y_ptr + rows[:, None] * stride_ym + dst_col[None, :], t, mask=ok)


def split_p(p: int) -> tuple[int, int]:
    """p = p1 * p2 with both factors in [16, 128] (p1 = 1 when p <= 128)."""
    if p <= 128:
        return 1, p
    p1 = max(16, p // 128)
    return p1, p // p1


def mix_factor(n: int) -> torch.Tensor | None:
    """M of `online_factors(n)` as float32 (m, m), or None when n is a power of two."""
    from qfx.algorithms.hadamard import online_factors

    m_mat, _ = online_factors(n)
    return None if m_mat is None else m_mat.float()


def supported(n: int) -> tuple[bool, str]:
    """(whether rows of length n run here, the reason when not)."""
    from qfx.algorithms.hadamard import online_factors

    m_mat, p = online_factors(n)
    m = 1 if m_mat is None else m_mat.shape[0]
    mp = 1 if m == 1 else max(16, triton.next_power_of_2(m))
    if p < 16:
        return False, f"rotation of size {n}: its power-of-two factor {p} is below 16"
    if m > MAX_M:
        return False, f"rotation of size {n}: its factor m = {m} is above {MAX_M}"
    if mp * p > MAX_ROW_TILE:
        return False, f"rotation of size {n}: a padded row of {mp * p} elements is above {MAX_ROW_TILE}"
    return True, ""


def _launch(x2: torch.Tensor, mix: torch.Tensor | None, out: torch.Tensor, scale: torch.Tensor | None,
            fp8: bool = False) -> None:
    r, n = x2.shape
    m = 1 if mix is None else mix.shape[0]
    p = n // m
    p1, p2 = split_p(p)
    mp = 1 if m == 1 else max(16, triton.next_power_of_2(m))
    rows = 1 if m > 1 else max(1, 16 // p1)
    tile = rows * mp * p
    _hadamard_rows_kernel[(triton.cdiv(r, rows),)](
        x2, out if mix is None else mix, out, scale if scale is not None else out, r, x2.stride(0), out.stride(0),
        1.0 / math.sqrt(p), M_FACT=m, MP=mp, P1=p1, P2=p2, ROWS=rows, QUANT=scale is not None, FP8=fp8,
        EXACT_FP8_CAST=fp8 and interpreting(), EXACT_BF16_CAST=x2.dtype == torch.bfloat16 and interpreting(),
        num_warps=8 if tile >= 8192 else 4)


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


def hadamard_rows_ref(x: torch.Tensor) -> torch.Tensor:
    """The kernel's function in plain PyTorch (`qfx.ops.hadamard_ref`)."""
    from qfx.ops import hadamard_ref

    return hadamard_ref(x)
