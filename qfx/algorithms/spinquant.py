"""SpinQuant's tensor math: the Cayley step that keeps a rotation orthogonal, and the
activation quantizer's gradient (LSQ's estimator) the learning differentiates through.
The learning itself, which runs the captured graph, is `qfx.learn_rotations`."""

from __future__ import annotations

import torch

from qfx import primitives as P


def cayley_step(r: torch.Tensor, grad: torch.Tensor, lr: float) -> torch.Tensor:
    """One Cayley descent step on the orthogonal group (float64 inside; r's dtype out).

    The step is min(lr, 1 / ||A||_1), as in Li et al.'s Cayley SGD: a large gradient early on
    cannot throw the rotation far from where it started."""
    x, g = r.double(), grad.double()
    a = g @ x.T - x @ g.T
    step = min(lr, 1.0 / (torch.linalg.matrix_norm(a, ord=1).item() + 1e-8))
    eye = torch.eye(x.shape[0], dtype=x.dtype, device=x.device)
    return torch.linalg.solve(eye + step / 2 * a, (eye - step / 2 * a) @ x).to(r.dtype)


def straight_through(x: torch.Tensor, fq: torch.Tensor) -> torch.Tensor:
    """Forward fq, backward identity (straight-through)."""
    return x + (fq - x).detach()


class LsqActivation(torch.autograd.Function):
    """x (..., K) fake-quantized per token as `qfx.primitives.quantize_per_token` does, as
    float32, with LSQ's gradient: straight through the rounding wherever the code is in range,
    and through the scale s = clip_ratio * max|x| / ((qmax - qmin) / 2) into each token's
    largest |x|, with d(s q)/ds = q - x / s (q where the code is clamped).

    Written out by hand so that backward keeps only x and the (..., 1) scales: the same
    gradient through autograd's ops kept about four float32 copies of every quantized input."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bits: int, clip_ratio: float) -> torch.Tensor:
        qmin, qmax = P.qrange(bits, True)
        half_range = (qmax - qmin) / 2
        xf = x.float()
        amax = xf.abs().amax(-1, keepdim=True) * clip_ratio  # the same float32 ops as quantize_per_token's
        scale = torch.clamp(amax / half_range, min=P._EPS)
        ctx.save_for_backward(x, scale)
        ctx.qrange, ctx.ds_dmax = (qmin, qmax), clip_ratio / half_range
        return torch.clamp(torch.round(xf / scale), qmin, qmax) * scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, scale = ctx.saved_tensors
        qmin, qmax = ctx.qrange
        xf = x.float()
        u = xf / scale
        codes = torch.round(u)
        inside = (codes >= qmin) & (codes <= qmax)
        codes = codes.clamp(qmin, qmax)
        grad_scale = (grad * torch.where(inside, codes - u, codes)).sum(-1, keepdim=True)
        grad_scale = grad_scale * (scale > P._EPS)  # a clamped (all-zero) token's scale is a constant
        mag = xf.abs()
        top = (mag == mag.amax(-1, keepdim=True)).float()
        top = top / top.sum(-1, keepdim=True)  # amax shares its gradient between ties, as autograd's does
        grad_x = torch.where(inside, grad, 0.0) + grad_scale * ctx.ds_dmax * torch.sign(xf) * top
        return grad_x.to(x.dtype), None, None
