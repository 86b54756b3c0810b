"""Hessian observers: accumulate H = 2/n * sum x^T x over the tokens of a linear's input.

These are the statistics GPTQ-style algorithms consume; the observers do no solving.

Calibration samples are windows cut from running text, and the first token of each window
becomes the model's attention sink: every later token reads its key and value, so an error
on that token's row is repeated across the whole window. With plain averaging it weighs
1/seq_len of the Hessian and GPTQ pushes error onto it (measured on SmolLM2: 3-bit GPTQ
ended *worse* than RTN, with the sink's v_proj output error 5x RTN's). `first_token_weight`
counts each window's first row that many times.
"""

from __future__ import annotations

import torch

from qfx.observers.range import ObserverError


def _weighted_rows(x: torch.Tensor, first_token_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, S, K) or (S, K) -> rows (n, K) float32, and per-row weights (n, 1)."""
    rows = x.detach().float()
    if rows.dim() == 2:
        rows = rows.unsqueeze(0)
    rows = rows.reshape(-1, rows.shape[-2], rows.shape[-1])  # (B, S, K)
    weights = torch.ones(rows.shape[:2], device=rows.device)
    weights[:, 0] = first_token_weight
    return rows.reshape(-1, rows.shape[-1]), weights.reshape(-1, 1)


class HessianObserver(torch.nn.Module):
    """Running weighted mean of 2 * x^T x over rows of x (..., K); H is (K, K) float32."""

    def __init__(self, in_features: int, name: str = "", device: torch.device | str | None = None,
                 first_token_weight: float = 1.0) -> None:
        super().__init__()
        self.name = name
        self.first_token_weight = float(first_token_weight)
        # allocated on the first batch, where the batch is: only the block being calibrated holds one
        self.in_features = in_features
        self.register_buffer("hessian", torch.zeros(0, device=device))
        self.n_tokens = 0
        self.weight_sum = 0.0
        self.enabled = True

    def _allocate(self, device: torch.device) -> None:
        if self.hessian.numel() == 0:
            self.hessian = torch.zeros(self.in_features, self.in_features, device=device)

    def _check(self, rows: torch.Tensor) -> None:
        if not torch.isfinite(rows).all():
            raise ObserverError(f"non-finite values (NaN/inf) in calibration activations at {self.name or '?'}")

    def _accumulate(self, buf: torch.Tensor, lhs: torch.Tensor, rhs: torch.Tensor, w: torch.Tensor, total: float):
        # running mean keeps magnitudes bounded however many tokens arrive
        buf.mul_(self.weight_sum / total).add_((lhs * w).T @ rhs, alpha=2.0 / total)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        rows, w = _weighted_rows(x, self.first_token_weight)
        self._check(rows)
        self._allocate(rows.device)
        total = self.weight_sum + float(w.sum())
        self._accumulate(self.hessian, rows, rows, w, total)
        self.weight_sum = total
        self.n_tokens += rows.shape[0]
        return x

    def release(self) -> None:
        """Free the statistics once they are consumed."""
        self.hessian = torch.empty(0, device=self.hessian.device)


class AsymmetricHessianObserver(HessianObserver):
    """GPTAQ's statistics: H = 2/n X~^T X~ over the quantized model's inputs X~, and
    D = 2/n (X - X~)^T X~ with X the full-precision model's inputs for the same tokens.

    The driver runs each batch twice: first through the full-precision stream with
    `mode = "fp"` (the input is kept), then through the quantized stream with `mode = "q"`.
    """

    def __init__(self, in_features: int, name: str = "", device=None, first_token_weight: float = 1.0) -> None:
        super().__init__(in_features, name, device, first_token_weight)
        self.register_buffer("delta_cross", torch.zeros(0, device=device))
        self.mode = "q"
        self._fp_rows: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.mode == "fp":
            self._fp_rows = x.detach()
            return x
        if self._fp_rows is None or self._fp_rows.shape != x.shape:
            raise ObserverError(f"{self.name or '?'}: GPTAQ needs the full-precision input of each batch first "
                                "(run it through qfx.calibrate)")
        rows, w = _weighted_rows(x, self.first_token_weight)
        fp_rows, _ = _weighted_rows(self._fp_rows, self.first_token_weight)
        self._check(rows)
        self._check(fp_rows)
        self._allocate(rows.device)
        if self.delta_cross.numel() == 0:
            self.delta_cross = torch.zeros_like(self.hessian)
        fp_rows = fp_rows.to(rows.device)
        total = self.weight_sum + float(w.sum())
        self._accumulate(self.hessian, rows, rows, w, total)
        self._accumulate(self.delta_cross, fp_rows - rows, rows, w, total)
        self.weight_sum = total
        self.n_tokens += rows.shape[0]
        self._fp_rows = None
        return x

    def release(self) -> None:
        super().release()
        self.delta_cross = torch.empty(0, device=self.delta_cross.device)
