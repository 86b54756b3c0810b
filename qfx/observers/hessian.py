"""Hessian observer: accumulates H = 2/n * sum X^T X over the tokens of a linear's input.

This is the statistic GPTQ-style algorithms consume; the observer itself does no solving.
"""

from __future__ import annotations

import torch

from qfx.observers.range import ObserverError


class HessianObserver(torch.nn.Module):
    """Running mean of 2 * x^T x over rows of x (..., K); H is (K, K) float32."""

    def __init__(self, in_features: int, name: str = "", device: torch.device | str | None = None) -> None:
        super().__init__()
        self.name = name
        self.register_buffer("hessian", torch.zeros(in_features, in_features, device=device))
        self.n_tokens = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.detach().reshape(-1, x.shape[-1]).float()
        if not torch.isfinite(rows).all():
            raise ObserverError(f"non-finite values (NaN/inf) in calibration activations at {self.name or '?'}")
        n = rows.shape[0]
        total = self.n_tokens + n
        # running mean keeps magnitudes bounded however many tokens arrive
        self.hessian.mul_(self.n_tokens / total).add_(rows.T @ rows, alpha=2.0 / total)
        self.n_tokens = total
        return x
