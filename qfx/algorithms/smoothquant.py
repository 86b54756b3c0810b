"""SmoothQuant (Xiao et al., 2023): divide a region's input channels by s and multiply the
weights' columns by s, so that activation outliers move into the weights, which quantize
per channel more easily:

    s_j = max|X_j|^alpha / max_i |W_ij|^(1 - alpha)      (max over every linear of the region)

Pure tensor math; folding s into the producer is `qfx.regions.apply_scale`.
"""

from __future__ import annotations

import torch

from qfx import primitives as P
from qfx.config import QuantSpec

ALPHA_GRID = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def smooth_scales(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s (K,) float64 from per-channel activation abs max (K,) and weights [(N_i, K)]."""
    w_max = torch.stack([w.detach().abs().amax(0).double() for w in weights]).amax(0)
    a = act_absmax.double().to(w_max.device).clamp(min=1e-5)
    return (a.pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)).clamp(min=1e-5)


def fake_quantize_rows(x: torch.Tensor, spec: QuantSpec | None) -> torch.Tensor:
    """Per-token (dynamic) or per-tensor quantize-dequantize of activations x (n, K)."""
    if spec is None:
        return x
    if spec.dtype == "fp8":
        scale = P.fp8_scale(x.abs().amax(-1, keepdim=True))
        return P.fp8_quantize(x, scale).float() * scale
    amax = x.abs().amax(-1, keepdim=True) if spec.granularity == "token" else x.abs().amax()
    scale, _ = P.choose_qparams(-amax, amax, spec.bits, True)
    return P.dequantize(P.quantize(x, scale, None, spec.bits), scale, None, spec.bits)


def fake_quantize_weight(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    if spec.dtype == "fp8":
        scale = P.fp8_scale(w.abs().amax(-1, keepdim=True))
        return P.fp8_quantize(w, scale).float() * scale
    group = spec.group_size if spec.granularity == "group" else None
    return P.fake_quantize_weight(w, spec.bits, spec.symmetric, group, spec.clip_ratio)


def region_error(x: torch.Tensor, weights: list[torch.Tensor], s: torch.Tensor, w_spec: QuantSpec,
                 a_spec: QuantSpec | None) -> float:
    """Sum over the region's linears of ||Q_a(x / s) Q_w(W s)^T - x W^T||^2 on rows x (n, K)."""
    x = x.float()
    s = s.float().to(x.device)
    xs = fake_quantize_rows(x / s, a_spec)
    total = 0.0
    for w in weights:
        w = w.float().to(x.device)
        total += float((xs @ fake_quantize_weight(w * s, w_spec).T - x @ w.T).pow(2).sum())
    return total


def search_alpha(act_absmax: torch.Tensor, x: torch.Tensor, weights: list[torch.Tensor], w_spec: QuantSpec,
                 a_spec: QuantSpec | None, tie=lambda s: s) -> tuple[float, torch.Tensor]:
    """The alpha of ALPHA_GRID with the least `region_error` on sampled rows x, and its scale."""
    best = None
    for alpha in ALPHA_GRID:
        s = tie(smooth_scales(act_absmax, weights, alpha))
        err = region_error(x, weights, s, w_spec, a_spec)
        if best is None or err < best[0]:
            best = (err, alpha, s)
    return best[1], best[2]
