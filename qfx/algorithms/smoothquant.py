"""SmoothQuant (Xiao et al., 2023): divide a region's input channels by s and multiply the
weights' columns by s, so that activation outliers move into the weights, which quantize
per channel more easily:

    s_j = max|X_j|^alpha / max_i |W_ij|^(1 - alpha)      (max over every linear of the region)

Pure tensor math; folding s into the producer is `qfx.regions.apply_scale`.
"""

from __future__ import annotations

import torch

from qfx.config import QuantSpec
from qfx.quantizer import fake_quantize_activation, fake_quantize_weight

ALPHA_GRID = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def smooth_scales(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s (K,) float64 from per-channel activation abs max (K,) and weights [(N_i, K)]."""
    w_max = torch.stack([w.detach().abs().amax(0).double() for w in weights]).amax(0)
    a = act_absmax.double().to(w_max.device).clamp(min=1e-5)
    return (a.pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)).clamp(min=1e-5)


def region_error(x: torch.Tensor, weights: list[torch.Tensor], s: torch.Tensor, w_spec: QuantSpec,
                 a_spec: QuantSpec | None) -> float:
    """Sum over the region's linears of ||Q_a(x / s) Q_w(W s)^T - x W^T||^2 on rows x (n, K)."""
    x = x.float()
    s = s.float().to(x.device)
    xs = fake_quantize_activation(x / s, a_spec)
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
