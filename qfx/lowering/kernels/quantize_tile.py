"""Triton helpers that turn a float32 tile into int8 or e4m3 codes with per-row scales; shared by
the GEMM that quantizes its activations (`act_quant_gemm`) and the rotate-and-quantize pass
(`hadamard_rows`), so both round exactly as `qfx.primitives` does."""

import triton
import triton.language as tl


@triton.jit
def round_to_e4m3_grid(v):
    """v (|v| <= 448, float32) rounded half-to-even onto the e4m3 grid, still float32.

    Used under the Triton interpreter only, whose float32 -> e4m3 cast does not carry a
    mantissa round-up into the exponent (31.1 becomes 16, not 32); GPUs cast correctly.
    """
    exponent = ((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    ulp = ((tl.maximum(exponent, -6) - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 2^(e - 3)
    return ((tl.math.div_rn(v, ulp) + 12582912.0) - 12582912.0) * ulp  # 1.5 * 2^23: round half to even


@triton.jit
def quantize_tile_fp8(a, inv_scale, EXACT_FP8_CAST: tl.constexpr):
    """float32 tile (BM, BK) times 1/scale per row, saturated -> e4m3."""
    v = tl.minimum(tl.maximum(a * inv_scale[:, None], -448.0), 448.0)
    if EXACT_FP8_CAST:
        v = round_to_e4m3_grid(v)
    return v.to(tl.float8e4nv)


@triton.jit
def quantize_tile_int8(a, inv_scale):
    """float32 tile (BM, BK) times 1/scale per row, rounded half to even and clamped -> int8."""
    v = (a * inv_scale[:, None] + 12582912.0) - 12582912.0  # 1.5 * 2^23: rounds like torch.round
    return tl.minimum(tl.maximum(v, -128.0), 127.0).to(tl.int8)
