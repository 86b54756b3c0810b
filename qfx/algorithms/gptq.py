"""GPTQ (Frantar et al., 2022): quantize a weight column by column, pushing each column's
rounding error onto the columns not yet quantized, weighted by the inverse Hessian of the
layer's inputs, so that ||W X - Q X|| stays small rather than ||W - Q||.

Shapes: W (N, K) with K input features; H = 2/n * X^T X (K, K) from `HessianObserver`.
Pure tensor math: no FX, no modules. Quantization grid math comes from `qfx.primitives`.
"""

from __future__ import annotations

import warnings

import torch

from qfx import primitives as P


class HessianError(RuntimeError):
    """A Hessian that stays singular after the damping retries."""


def _qparams(w: torch.Tensor, bits: int, symmetric: bool, clip_ratio: float):
    """Min-max qparams of columns w (N, g) -> scale (N, 1), zero (N, 1) or None."""
    scale, zero = P.choose_qparams(w.amin(1, keepdim=True) * clip_ratio, w.amax(1, keepdim=True) * clip_ratio,
                                   bits, symmetric)
    return scale, zero


def search_qparams(w: torch.Tensor, h_diag: torch.Tensor, bits: int, symmetric: bool, clip_ratio: float,
                   grid: int = 20, min_shrink: float = 0.7):
    """Qparams of groups w (..., g) from the range min/max * clip_ratio * p, with p per group the
    one of `grid` + 1 steps in [min_shrink, 1] that minimises sum_k h_k (w_k - dq(w_k))^2:
    the rounding error weighted by the inputs' energy h_diag (broadcast to w; the Hessian's
    diagonal). -> scale (..., 1), zero (..., 1) or None. p = 1 (min-max) wins ties, so the
    error is never above min-max's.
    """
    lo, hi = w.amin(-1, keepdim=True) * clip_ratio, w.amax(-1, keepdim=True) * clip_ratio
    h = h_diag.to(w)
    best_err = best_scale = best_zero = None
    for i in range(grid + 1):
        p = 1.0 - (1.0 - min_shrink) * i / grid
        scale, zero = P.choose_qparams(lo * p, hi * p, bits, symmetric)
        err = ((w - P.dequantize(P.quantize(w, scale, zero, bits), scale, zero, bits)) ** 2 * h).sum(-1, keepdim=True)
        if best_err is None:
            best_err, best_scale, best_zero = err, scale, zero
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        if zero is not None:
            best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def inverse_hessian_cholesky(h: torch.Tensor, damp: float, retries: int = 4) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, retrying with 10x damping.

    Warns on each retry; raises HessianError when every retry fails. At most two (K, K)
    matrices live at once besides h (0.8 GB each for a 14336-wide input).
    """
    mean_diag = torch.mean(torch.diag(h))
    for attempt in range(retries + 1):
        d = damp * (10**attempt)
        damped = h.clone()
        damped.diagonal().add_(d * mean_diag)
        lower, info = torch.linalg.cholesky_ex(damped)
        del damped
        if int(info) == 0:
            hinv = torch.cholesky_inverse(lower)
            del lower
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return upper
        warnings.warn(f"GPTQ: Hessian not positive definite with damping {d:g}; retrying with {d * 10:g}",
                      stacklevel=3)
    raise HessianError(f"Hessian not positive definite even with damping {damp * 10**retries:g}")


def gptq_block_ref(w1: torch.Tensor, hinv1: torch.Tensor, cols: list[int], codes: torch.Tensor,
                   scale: torch.Tensor, zero: torch.Tensor | None, bits: int, symmetric: bool, group: int,
                   static: bool, clip_ratio: float, scale_dtype: torch.dtype | None = None) -> torch.Tensor:
    """One lazy batch of GPTQ's columns (original indices `cols`) in PyTorch; on CUDA the Triton
    kernel `qfx.algorithms.gptq_block` runs the same loop in one launch.

    w1 (N, width): the batch's current columns, used as scratch; codes (N, K) and, for non-static groups, scale / zero
    (N, G) are written at the batch's columns and groups (their scales rounded to nearest in
    `scale_dtype` when given, before the zero point and the codes). Returns e (N, width), each column's
    error over its inverse-Hessian pivot, for the update of the columns after the batch.
    """
    err1 = torch.zeros_like(w1)
    width = w1.shape[1]
    for i, col in enumerate(cols):
        gi = col // group
        if not static and col % group == 0:  # a new group: qparams from the freshest weights
            fresh = w1[:, i : i + group]
            lo, hi = fresh.amin(1) * clip_ratio, fresh.amax(1) * clip_ratio
            s, z = P.choose_qparams(lo, hi, bits, symmetric, scale_dtype)
            scale[:, gi] = s
            if zero is not None:
                zero[:, gi] = z
        s_col = scale[:, gi : gi + 1]
        z_col = None if zero is None else zero[:, gi : gi + 1]
        q = P.quantize(w1[:, i : i + 1], s_col, z_col, bits)
        dq = P.dequantize(q, s_col, z_col, bits)[:, 0]
        codes[:, col] = q[:, 0]
        e = (w1[:, i] - dq) / hinv1[i, i]
        w1[:, i:width] -= e.unsqueeze(1) * hinv1[i, i:width].unsqueeze(0)
        err1[:, i] = e
    return err1


def _use_kernel(w: torch.Tensor) -> bool:
    """Lazy batches run as one Triton launch each on CUDA in float32 (the kernel's only dtype)."""
    return w.is_cuda and w.dtype == torch.float32


def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor,
    bits: int,
    symmetric: bool,
    group_size: int | None,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    clip_ratio: float = 1.0,
    range_search: bool = False,
    scale_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """GPTQ of w (N, K) against Hessian h (K, K).

    Runs on w's device, in float32 (float64 inputs stay float64); on CUDA in float32 each lazy
    batch of columns is one Triton launch (`qfx.algorithms.gptq_block`).
    Returns codes (N, K) uint8, scale (N, G) float32, zero (N, G) uint8 or None, in the
    layout of `qfx.primitives` (groups contiguous in the original column order). With
    act_order, columns are visited by decreasing Hessian diagonal and group qparams are
    fixed up front from the original weights ("static groups"), so groups stay contiguous.
    range_search: static group ranges come from `search_qparams` (shrunk where that lowers the
    Hessian-diagonal-weighted rounding error) instead of min-max; groups chosen on the fly
    (no act_order) stay min-max.
    scale_dtype: scales that this dtype (e.g. the model's bfloat16) holds exactly, chosen before
    the columns they quantize, so GPTQ's error feedback sees the stored scales: static groups
    take the representable scale next to theirs with the lowest Hessian-diagonal-weighted
    rounding error (`P.representable_scale`); groups chosen on the fly round to nearest.
    """
    dtype = torch.promote_types(w.dtype, torch.float32)  # float32 at least; float64 stays float64
    w = w.detach().to(dtype).clone()
    h = h.detach().to(device=w.device, dtype=dtype).clone()
    n, k = w.shape
    dev = w.device
    g = k if group_size is None else group_size
    dead = torch.diag(h) == 0  # inputs that are always zero: any weight works, use 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    n_groups = P.n_groups(k, g)
    scale = torch.empty(n, n_groups, dtype=dtype, device=dev)
    zero = None if symmetric else torch.empty(n, n_groups, dtype=torch.uint8, device=dev)
    static = act_order or group_size is None
    if static:  # qparams from the original weights, per contiguous group
        if range_search:  # all groups at once: (N, G, g), the short last group padded with zero weight
            s, z = search_qparams(P.to_groups(w, g), P.to_groups(torch.diag(h), g), bits, symmetric, clip_ratio)
            scale[:] = s[..., 0]
            if zero is not None:
                zero[:] = z[..., 0]
        else:
            for gi in range(n_groups):
                s, z = _qparams(w[:, gi * g : (gi + 1) * g], bits, symmetric, clip_ratio)
                scale[:, gi] = s[:, 0]
                if zero is not None:
                    zero[:, gi] = z[:, 0]
        if scale_dtype is not None and scale_dtype != dtype:
            scale[:] = P.representable_scale(P.to_groups(w, g), scale.unsqueeze(-1), None if zero is None else
                                             zero.unsqueeze(-1), bits, scale_dtype,
                                             P.to_groups(torch.diag(h), g)).squeeze(-1)
    rounding = None if static or scale_dtype == dtype else scale_dtype

    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k, device=dev)
    if act_order:  # one step at a time, so that at most two (K, K) copies are alive
        w = w[:, perm]
        h = h[perm]
        h = h[:, perm]
    hinv = inverse_hessian_cholesky(h, damp)
    del h  # only its inverse's factor is needed from here

    # lazy batches of whole groups, so a group's qparams come from columns of one batch
    width = block_size if static else max(1, block_size // g) * g
    fused = _use_kernel(w)
    codes = torch.zeros(n, k, dtype=torch.uint8, device=dev)
    for i1 in range(0, k, width):
        i2 = min(i1 + width, k)
        w1, hinv1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        if fused:
            from qfx.algorithms.gptq_block import gptq_block

            err1 = gptq_block(w1, hinv1, perm[i1:i2], codes, scale, zero, bits, symmetric, g, static, clip_ratio,
                              rounding)
        else:
            err1 = gptq_block_ref(w1, hinv1, perm[i1:i2].tolist(), codes, scale, zero, bits, symmetric, g, static,
                                  clip_ratio, rounding)
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return codes, scale.float(), zero
