"""AWQ (Lin et al., 2024): activation-aware weight quantization.

1. Scales: for a region with mean input magnitude m (K,), try s = m^r for r on a grid in
   [0, 1), normalised to geometric mean 1 over its extremes, fold it in, quantize the region's
   weights, and keep the r whose *block output* is closest to the full-precision one (the
   search itself runs the block; see qfx.calibrate). Salient input channels get larger
   weights, so a smaller relative rounding error.
2. Clipping: per output row and group, shrink the weight range to r * [min, max] for r on
   a grid down to 1 - max_shrink, keeping the r with the least output error on sampled
   inputs. AWQ+ searches the two ends separately (asymmetric clip) for zero-point formats.

Pure tensor math: x rows (n, K), w (N, K).
"""

from __future__ import annotations

import torch

from qfx import primitives as P
from qfx.config import QuantSpec

SCALE_GRID = 20
CLIP_GRID = 20
MAX_SHRINK = 0.5


def scale_ratios(n: int = SCALE_GRID) -> list[float]:
    return [i / n for i in range(n)]


def awq_scale(act_mean: torch.Tensor, ratio: float) -> torch.Tensor:
    """s = m^ratio / sqrt(max * min) (K,) float64; m is the mean |x| per input channel."""
    s = act_mean.double().clamp(min=1e-4).pow(ratio)
    return s / (s.max() * s.min()).sqrt()


def search_scale(act_mean: torch.Tensor, tie, block_error) -> torch.Tensor:
    """AWQ's grid search: the scale s (K,) among `awq_scale(act_mean, ratio)` over
    `scale_ratios()` whose `block_error(s)` is least. tie: makes s equal across channels that
    must share a scale (`Region.tie`); block_error: the block's output error with s folded in
    and the region's weights fake-quantized (the caller runs the block)."""
    best = None
    for ratio in scale_ratios():
        s = tie(awq_scale(act_mean, ratio))
        err = block_error(s)
        if best is None or err < best[0]:
            best = (err, s)
    return best[1]


def _group_error(w: torch.Tensor, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Output error per (row, group) of w (N, G, g) quantized with range [lo, hi] (N, G) on x (n, G, g)."""
    scale, zero = P.choose_qparams(lo, hi, spec.bits, spec.symmetric)
    scale = scale.unsqueeze(-1)
    zero = None if zero is None else zero.unsqueeze(-1)
    wq = P.dequantize(P.quantize(w.clamp(lo.unsqueeze(-1), hi.unsqueeze(-1)), scale, zero, spec.bits),
                      scale, zero, spec.bits)
    # (n, G, g) x (N, G, g) -> (n, N, G): each group's contribution to each output
    diff = torch.einsum("tgk,ngk->tng", x, wq - w)
    return diff.pow(2).mean(0)


def clip_search(w: torch.Tensor, x: torch.Tensor, spec: QuantSpec, asymmetric: bool = False,
                grid: int = CLIP_GRID, max_shrink: float = MAX_SHRINK, rows_per_step: int = 256) -> torch.Tensor:
    """w (N, K) clamped to the per-(row, group) range that minimises the output error on x (n, K).

    Returns w's clamped copy (float32). `asymmetric` (zero-point formats only) refines the low
    and high ends separately after the joint search.
    """
    group = spec.group_size if spec.granularity == "group" else None
    k = w.shape[1]
    g = k if group is None else group
    wg = P.to_groups(w.float(), g)  # (N, G, g)
    xg = P.to_groups(x.float().to(w.device), g)  # (n, G, g)
    ratios = [1 - max_shrink * i / grid for i in range(grid + 1)]
    out = torch.empty_like(wg)
    for r0 in range(0, wg.shape[0], rows_per_step):
        wb = wg[r0 : r0 + rows_per_step]
        lo0, hi0 = wb.amin(-1), wb.amax(-1)
        if spec.symmetric:
            lo0 = hi0 = None
            amax = wb.abs().amax(-1)
            lo0, hi0 = -amax, amax
        best_err = torch.full(lo0.shape, float("inf"), device=w.device)
        best_lo, best_hi = lo0.clone(), hi0.clone()

        def consider(lo, hi):
            nonlocal best_err
            err = _group_error(wb, xg, lo, hi, spec)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo.copy_(torch.where(better, lo, best_lo))
            best_hi.copy_(torch.where(better, hi, best_hi))

        for r in ratios:
            consider(lo0 * r, hi0 * r)
        if asymmetric and not spec.symmetric:
            hi_fixed = best_hi.clone()
            for r in ratios:
                consider(lo0 * r, hi_fixed)
            lo_fixed = best_lo.clone()
            for r in ratios:
                consider(lo_fixed, hi0 * r)
        out[r0 : r0 + rows_per_step] = wb.clamp(best_lo.unsqueeze(-1), best_hi.unsqueeze(-1))
    return P.from_groups(out, k)
