"""GEMM with activations quantized per token inside the kernel: W8A8 int8, W4A8, FP8 rowwise.

y = (s_x * q_x) @ (s_w * q_w)^T + bias, where q_x = round(x / s_x) (int8) or x / s_x cast to e4m3
(fp8), s_x = absmax(row) / 127.5 (int8) or / 448 (fp8) per token, or one static scale.

Each program owns a (BLOCK_M, BLOCK_N) tile of y. Dynamic scales: first a pass over its
BLOCK_M rows of x for their absmax (the rows are re-read by every N tile, from L2), then the
main loop quantizes each x tile as it is loaded, so no quantized copy of x is ever written.
The dot runs on int8 (int32 accumulate) or e4m3 (float32 accumulate) tensor cores. Per-channel
weight scales multiply once in the epilogue; group-wise ones (W4A8 g64) scale each K step's
partial product (BLOCK_K divides the group).
Weights: int8 codes in the "rows" layout, int4/int2.. codes unpacked from the "packed" layout
(symmetric: q = u - 2^(bits-1), so that they fit int8), or fp8 rows.

FP8 with per-token scales (dynamic, or codes already quantized) and bf16 output has one more
candidate, "scaled_mm": the row quantization pass, then `torch._scaled_mm` with row and column
scales (cuBLAS). The tuner times it against the Triton configs above M = 16; at M = 2048 it
made the FP8 GEMMs of the Llama-3-8B shapes 1.35-1.47x faster on an H100
(benchmarks/results/kernels.md), at M = 16 it lost on every one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qfx.lowering.kernels import interpreting, split_k, tuning, wint_a16
from qfx.lowering.kernels.layout import KernelWeight, dequantize_kernel_weight
from qfx.lowering.kernels.hadamard_rows import hadamard_quantize_rows, hadamard_rows
from qfx.lowering.kernels.quantize_tile import quantize_tile_fp8, quantize_tile_int8
from qfx.lowering.kernels.split_k import store_tile
from qfx.lowering.kernels.tuning import Config
from qfx.lowering.kernels.wint_a16 import (fit_block_k, fit_split, load_packed_codes, load_packed_codes_once,
                                           tile_ids)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, FP8: tl.constexpr, EXACT_FP8_CAST: tl.constexpr,
                          BLOCK_K: tl.constexpr, ONE_PASS: tl.constexpr):
    """One row of x per program: its scale (absmax / 127.5 or / 448) and its codes (M, K).
    ONE_PASS (K <= BLOCK_K): the row is read once and held; else read twice, for its absmax and
    then its codes."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_K)
    if ONE_PASS:
        a = tl.load(x_ptr + row * stride_xm + offs, mask=offs < K, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(a), axis=0) + tl.zeros((1,), dtype=tl.float32)
    else:
        amax = tl.zeros((1,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a = tl.load(x_ptr + row * stride_xm + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(a), axis=0))
    scale = tl.maximum(tl.math.div_rn(amax, 448.0 if FP8 else 127.5), 1e-12)
    inv = tl.math.div_rn(tl.full((1,), 1.0, tl.float32), scale)
    tl.store(s_ptr + row + tl.arange(0, 1), scale)
    for k0 in range(0, K, BLOCK_K):  # one step when ONE_PASS
        if not ONE_PASS:
            a = tl.load(x_ptr + row * stride_xm + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        if FP8:
            q = quantize_tile_fp8(a[None, :], inv, EXACT_FP8_CAST)
        else:
            q = quantize_tile_int8(a[None, :], inv)
        tl.store(q_ptr + row * K + k0 + offs[None, :], q, mask=(k0 + offs < K)[None, :])


@triton.jit
def _act_quant_gemm_kernel(
    x_ptr, w_ptr, ws_ptr, as_ptr, b_ptr, y_ptr, part_ptr, cnt_ptr,
    M, N, K, GROUP, stride_xm, stride_ym, SPLIT_K,
    BITS: tl.constexpr, CONTAINER: tl.constexpr, ROWS: tl.constexpr, FP8: tl.constexpr,
    A_MODE: tl.constexpr, GROUPED: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
    EXACT_FP8_CAST: tl.constexpr, UNPACK_ONCE: tl.constexpr, SWAP_AB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """A_MODE 0: x float, scales per row computed here (dynamic); 1: x float, one static scale
    at as_ptr; 2: x already quantized (int8/e4m3 codes), its row scales at as_ptr.
    SWAP_AB: the tile of y^T = W x^T, so that the (unpacked) weight tile is the tensor cores'
    first operand, read from registers, and the x tile (K contiguous, as 8-bit operands must
    be on Hopper) the second; the accumulator is transposed once at the end."""
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    if A_MODE == 2:
        a_scale = tl.load(as_ptr + offs_m, mask=mask_m, other=1.0)
    elif A_MODE == 1:
        a_scale = tl.zeros((BLOCK_M,), dtype=tl.float32) + tl.load(as_ptr).to(tl.float32)
    else:
        amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(x_rows + offs_k[None, :], mask=mask_m[:, None] & (offs_k < K)[None, :], other=0.0)
            amax = tl.maximum(amax, tl.max(tl.abs(a.to(tl.float32)), axis=1))
        a_scale = tl.maximum(tl.math.div_rn(amax, 448.0 if FP8 else 127.5), 1e-12)
    inv_scale = tl.math.div_rn(tl.full((BLOCK_M,), 1.0, tl.float32), a_scale)
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        acc_i = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_i = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(x_rows + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if A_MODE != 2:
            if FP8:
                a = quantize_tile_fp8(a.to(tl.float32), inv_scale, EXACT_FP8_CAST)
            else:
                a = quantize_tile_int8(a.to(tl.float32), inv_scale)
        if ROWS:
            w = tl.load(w_ptr + offs_n[None, :] * K + offs_k[:, None], mask=mask_k[:, None] & mask_n[None, :],
                        other=0.0)
        else:
            if UNPACK_ONCE:
                codes = load_packed_codes_once(w_ptr, k0, offs_n, mask_n, K, N, CONTAINER, BLOCK_K, BLOCK_N)
            else:
                codes = load_packed_codes(w_ptr, offs_k, offs_n, mask_k, mask_n, N, CONTAINER)
            w = (codes - (1 << (BITS - 1))).to(tl.int8)
        if SWAP_AB:
            a, w = tl.trans(w), tl.trans(a)  # (BLOCK_N, BLOCK_K) @ (BLOCK_K, BLOCK_M)
        if FP8:
            part = tl.dot(a, w)
        else:
            part = tl.dot(a, w, out_dtype=tl.int32)
        if GROUPED:
            s = tl.load(ws_ptr + (k0 // GROUP) * N + offs_n, mask=mask_n, other=0.0)
            if SWAP_AB:
                acc += part.to(tl.float32) * s[:, None]
            else:
                acc += part.to(tl.float32) * s[None, :]
        elif FP8:
            acc += part
        else:
            acc_i += part
    if SWAP_AB:
        acc = tl.trans(acc)
        acc_i = tl.trans(acc_i)
    if not GROUPED:
        if not FP8:
            acc = acc_i.to(tl.float32)
        acc = acc * tl.load(ws_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    acc = acc * a_scale[:, None]
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    store_tile(acc, y_ptr, offs_m, offs_n, mask_m, mask_n, stride_ym, part_ptr, cnt_ptr,
               pid_m * tl.cdiv(N, BLOCK_N) + pid_n, M, N, SPLIT_K, SPLIT)


def candidates(m: int, group: int, k: int, packed: bool = False, scaled_mm: bool = False,
               gemv: bool = False) -> list[Config]:
    """Explicit configs by M bucket; int8/fp8 dots want BLOCK_K >= 32. "prequant" configs quantize
    the activations in a separate pass first, so the GEMM reads int8/e4m3 x once per N tile
    instead of re-quantizing it in every one (always above M = 64; up to 64, both compete: the
    extra launch against the re-quantizing). For packed (int4..) weights each config
    also comes as "<variant>-once": each word of a W tile loaded once and shifted per code.
    "swapped-<variant>" computes y^T (see the kernel's SWAP_AB).
    scaled_mm: add the cuBLAS candidate (see the module docstring) above M = 16.
    gemv: add, at M = 1, the weight-only gemv kernel's configs run on the row's int8 codes
    (`wint_a16.launch_gemv` with the row scale; packed weights with per-token scales)."""
    if m <= 16:
        cfgs = [Config(16, n, bk, s, 4, st) for n, bk, s, st in
                [(64, 128, 1, 4), (64, 256, 2, 3), (32, 256, 4, 4), (128, 128, 4, 4), (64, 128, 8, 4), (32, 128, 1, 4),
                 (64, 256, 4, 3)]]
        cfgs += [c._replace(variant="prequant") for c in cfgs]
    elif m <= 64:
        cfgs = [Config(bm, n, bk, s, 4, st) for bm, n, bk, s, st in
                [(64, 64, 128, 1, 4), (32, 64, 128, 2, 4), (64, 128, 128, 2, 4), (32, 32, 256, 1, 4), (64, 64, 128, 4, 4),
                 (64, 64, 256, 1, 3), (32, 64, 256, 2, 3)]]
        cfgs += [c._replace(variant="prequant") for c in cfgs]
    elif m <= 256:
        cfgs = [Config(bm, n, bk, s, w, st, variant="prequant") for bm, n, bk, s, w, st in
                [(64, 128, 128, 1, 4, 4), (128, 128, 128, 1, 8, 3), (64, 64, 128, 1, 4, 4), (128, 64, 128, 1, 4, 4),
                 (64, 256, 128, 1, 8, 3), (128, 64, 128, 2, 8, 4), (64, 128, 128, 2, 8, 4)]]
    else:
        cfgs = [Config(bm, n, bk, 1, w, st, variant="prequant") for bm, n, bk, w, st in
                [(128, 128, 128, 8, 3), (128, 256, 128, 8, 3), (128, 128, 64, 4, 4), (256, 128, 128, 8, 3),
                 (128, 128, 128, 4, 4), (128, 256, 64, 8, 4)]]
    # y^T = W x^T tiles (the weights feed the tensor cores from registers; BLOCK_N is the
    # instruction's M side, so M = 1..16 does not fill a 64-row instruction with padding)
    if m <= 16:
        swapped = [(16, 64, 128, 4, 4, 3), (16, 128, 128, 4, 4, 3), (16, 64, 256, 2, 4, 3), (16, 128, 128, 8, 4, 3),
                   (16, 64, 128, 8, 4, 3)]
    elif m <= 64:
        swapped = [(64, 64, 128, 2, 4, 3), (64, 128, 128, 2, 4, 3), (64, 64, 128, 4, 4, 3), (64, 128, 128, 1, 4, 4)]
    elif m <= 256:
        swapped = [(128, 64, 128, 1, 4, 4), (128, 128, 128, 1, 8, 3), (256, 128, 128, 1, 8, 3), (64, 128, 128, 1, 4, 4)]
    else:
        swapped = [(128, 128, 128, 1, 8, 3), (256, 128, 128, 1, 8, 3), (128, 256, 128, 1, 8, 3), (128, 128, 128, 1, 4, 4)]
    cfgs += [Config(bm, n, bk, s, w, st, variant="swapped-prequant") for bm, n, bk, s, w, st in swapped]
    if packed:
        cfgs += [c._replace(variant=c.variant + "-once") for c in cfgs]
    if scaled_mm and m > 16:
        cfgs.append(Config(0, 0, 0, variant="scaled_mm"))
    if gemv and m == 1:
        cfgs += wint_a16.GEMV
    return [fit_block_k(c, group, k) for c in cfgs]


def scaled_mm_applies(kw: KernelWeight, a_scale: torch.Tensor | None, out_dtype: torch.dtype) -> bool:
    """Whether the "scaled_mm" candidate computes this call: fp8 per-channel weights, per-token
    scales (not one static scale) and bf16 output (what cuBLAS's row-wise scaling writes), and
    N, K multiples of 16 (its layout rule)."""
    return (kw.fp8 and kw.group >= kw.k and a_scale is None and out_dtype == torch.bfloat16
            and kw.n % 16 == 0 and kw.k % 16 == 0)


def supported(kw: KernelWeight) -> bool:
    """Symmetric int weights (codes fit int8) with groups of >= 32 (or per channel), or fp8."""
    if kw.fp8:
        return kw.group >= kw.k
    return kw.zero is None and (kw.group >= kw.k or kw.group % 32 == 0)


CODES = (torch.int8, torch.float8_e4m3fn)  # x already quantized: a_scale holds its row scales
ROW_BLOCK = 16384  # longest row quantize_rows holds at once (16 warps, 32 values a thread)


def quantize_rows(x2: torch.Tensor, fp8: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) -> (codes (M, K) int8 or float8_e4m3fn, row scales (M,) float32)."""
    m, k = x2.shape
    q = torch.empty((m, k), device=x2.device, dtype=torch.float8_e4m3fn if fp8 else torch.int8)
    scale = torch.empty((m,), device=x2.device, dtype=torch.float32)
    block = min(ROW_BLOCK, triton.next_power_of_2(k))  # whole rows up to ROW_BLOCK: one read of x
    _quantize_rows_kernel[(m,)](x2, q, scale, k, x2.stride(0), FP8=fp8, EXACT_FP8_CAST=fp8 and interpreting(),
                                BLOCK_K=block, ONE_PASS=block >= k,
                                num_warps=max(4, min(16, block // 1024)))
    return q, scale


def launch(x2, kw: KernelWeight, a_scale, bias, cfg: Config, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """y (M, N) with the given config, for x2 (M, K) contiguous rows: float activations (y in
    their dtype), or already quantized ones (int8 / e4m3 codes, `a_scale` their row scales,
    y in `out_dtype`)."""
    cfg = fit_block_k(cfg, kw.group, kw.k)
    quantized = x2.dtype in CODES
    out_dtype = out_dtype or x2.dtype
    a_mode = 2 if quantized else 1 if a_scale is not None else 0
    if a_mode == 0 and cfg.variant.removeprefix("swapped-").startswith(("prequant", "scaled_mm", "gemv")):
        x2, a_scale = quantize_rows(x2, kw.fp8)
        a_mode = 2
    if cfg.variant == "gemv":
        if not (kw.layout == "packed" and a_mode == 2 and x2.shape[0] == 1):
            raise ValueError("the gemv variant takes packed int weights, per-token scales and one row")
        return wint_a16.launch_gemv(x2, kw, bias, cfg, row_scale=a_scale, out_dtype=out_dtype)
    if cfg.variant == "scaled_mm":
        if not (kw.fp8 and a_mode == 2 and out_dtype == torch.bfloat16):
            raise ValueError("the scaled_mm variant takes fp8 weights, per-token scales and bf16 output")
        # W rows (N, K) K-contiguous: their transpose is the column-major (K, N) cuBLAS reads
        return torch._scaled_mm(x2, kw.data.t(), scale_a=a_scale[:, None], scale_b=kw.scale, bias=bias,
                                out_dtype=out_dtype)
    m = x2.shape[0]
    cfg = fit_split(cfg, m, kw.n)
    y = torch.empty((m, kw.n), device=x2.device, dtype=out_dtype)
    part = split_k.workspace(cfg.split_k, m, kw.n, x2.device) if cfg.split_k > 1 else y
    grouped = kw.group < kw.k
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(kw.n, cfg.block_n), cfg.split_k)
    _act_quant_gemm_kernel[grid](
        x2, kw.data, kw.scale, a_scale, bias, y, part, split_k.counters(x2.device),
        m, kw.n, kw.k, kw.group if grouped else 1 << 30, x2.stride(0), y.stride(0), cfg.split_k,
        BITS=kw.bits, CONTAINER=kw.container, ROWS=kw.layout == "rows", FP8=kw.fp8,
        A_MODE=a_mode, GROUPED=grouped, HAS_BIAS=bias is not None, SPLIT=cfg.split_k > 1,
        EXACT_FP8_CAST=kw.fp8 and interpreting(), UNPACK_ONCE=cfg.variant.endswith("-once") and kw.layout == "packed",
        SWAP_AB=cfg.variant.startswith("swapped-"),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return y


def act_quant_linear(x: torch.Tensor, kw: KernelWeight, a_scale: torch.Tensor | None = None,
                     bias: torch.Tensor | None = None, config: Config | None = None, hadamard: bool = False,
                     mix: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x (..., K) bf16/fp16/fp32 -> (..., N); a_scale: static per-tensor scale (scalar) or None.
    Or x (..., K) int8 / e4m3 codes (`quantize_rows`), a_scale their row scales (...), and y in
    `out_dtype`.

    hadamard: the GEMM reads x @ H_K (the online rotation `qfx::hadamard`; `mix` is its factor
    `hadamard_rows.mix_factor(K)`), rotated and, with dynamic scales, quantized per row in one
    pass over x (`hadamard_rows.hadamard_quantize_rows`)."""
    x2 = x.reshape(-1, kw.k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if x.dtype in CODES:
        if a_scale is None or out_dtype is None:
            raise ValueError("act_quant_linear: quantized x needs its row scales and an out_dtype")
        a_scale = a_scale.reshape(-1).float().contiguous()
    else:
        out_dtype = x.dtype
    if hadamard:
        if a_scale is None:
            x2, a_scale = hadamard_quantize_rows(x2, mix, kw.fp8)
        else:
            x2 = hadamard_rows(x2, mix)
    if config is None:
        m = x2.shape[0]
        key = (f"act_quant/{tuning.m_bucket(m)}/{kw.n}/{kw.k}/{kw.bits}/{kw.fp8}/{kw.group}/"
               f"{a_scale is not None}/{x2.dtype}")
        static = a_scale is not None and x2.dtype not in CODES
        cands = candidates(m, kw.group, kw.k, packed=kw.layout == "packed",
                           scaled_mm=scaled_mm_applies(kw, a_scale if static else None, out_dtype),
                           gemv=kw.layout == "packed" and not static)
        if x2.dtype != out_dtype:  # already quantized: "prequant" has nothing left to do
            cands = list(dict.fromkeys(c._replace(variant=c.variant.replace("prequant", "tiled")) for c in cands))
        config = tuning.pick(key, cands, lambda c: launch(x2, kw, a_scale, bias, c, out_dtype))
    return launch(x2, kw, a_scale, bias, config, out_dtype).reshape(*x.shape[:-1], kw.n)


def act_quant_ref(x: torch.Tensor, kw: KernelWeight, a_scale: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None, hadamard: bool = False) -> torch.Tensor:
    """The kernel's function in plain PyTorch (the same math as `qfx.ops.quantized_linear_ref`,
    after `qfx.ops.hadamard_ref` with `hadamard`)."""
    from qfx.ops import fake_quantize_activation, hadamard_ref

    if hadamard:
        x = hadamard_ref(x)
    xq = fake_quantize_activation(x, 8, a_scale, fp8=kw.fp8)
    y = xq @ dequantize_kernel_weight(kw).T
    return (y if bias is None else y + bias.float()).to(x.dtype)
