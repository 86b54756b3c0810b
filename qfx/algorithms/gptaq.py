"""GPTAQ (asymmetric calibration; Li et al., "GPTQv2", 2025): quantize W so that the quantized
layer, fed the *quantized* model's inputs X~, reproduces the *full-precision* model's outputs
W X, instead of W X~ as GPTQ does. This also corrects error carried in from earlier layers.

Rows x are tokens, W is (N, K). The objective ||X~ Q^T - X W^T||^2 is a quadratic in Q with
Hessian H = X~^T X~ (the same as GPTQ's) and unconstrained minimiser

    W* = W (X^T X~) H^-1 = W + W D H^-1,   D = (X - X~)^T X~   (K, K).

Up to a constant, the objective equals ||(Q - W*) X~^T||^2, so GPTQ's column-by-column error
feedback run from W* (instead of W) against H solves it: GPTAQ shares GPTQ's core and only
moves the starting point. `alpha` scales the correction (0 gives GPTQ): D is estimated from
the calibration tokens alone and a full step can overfit them.
"""

from __future__ import annotations

import torch

from qfx.algorithms.gptq import inverse_hessian_cholesky


def asymmetric_target(w: torch.Tensor, h: torch.Tensor, delta_cross: torch.Tensor, damp: float,
                      alpha: float = 1.0) -> torch.Tensor:
    """W + alpha * W D H^-1 for w (N, K), h and delta_cross (K, K); H damped as GPTQ damps it.

    Returns float32 (float64 stays float64) on w's device.
    """
    dtype = torch.promote_types(w.dtype, torch.float32)
    w = w.detach().to(dtype)
    h = h.to(device=w.device, dtype=dtype).clone()
    d = delta_cross.to(device=w.device, dtype=dtype)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    u = inverse_hessian_cholesky(h, damp)  # H^-1 = U^T U
    return w + alpha * ((w @ d) @ u.T) @ u
