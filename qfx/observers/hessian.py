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

from qfx import distributed
from qfx.observers.range import ObserverError


def _rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x (B, S, K) or (S, K) -> rows (B*S, K) float32 and S (each window's first row is row b*S)."""
    rows = x.detach().float()
    seq_len = rows.shape[-2] if rows.dim() > 1 else 1
    return rows.reshape(-1, rows.shape[-1]), seq_len


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

    def _accumulate(self, buf: torch.Tensor, lhs: torch.Tensor, rhs: torch.Tensor, seq_len: int) -> float:
        """buf <- running weighted mean of 2 lhs^T rhs, in place: no (K, K) or weighted-row
        temporaries, which for a 14336-wide input are 0.8 GB and 1 GB per pass. Returns the
        new total weight."""
        n = lhs.shape[0]
        firsts = n // seq_len
        total = self.weight_sum + n + (self.first_token_weight - 1.0) * firsts
        # running mean keeps magnitudes bounded however many tokens arrive
        buf.addmm_(lhs.T, rhs, beta=self.weight_sum / total, alpha=2.0 / total)
        if self.first_token_weight != 1.0:  # each window's first row counts first_token_weight times
            buf.addmm_(lhs[::seq_len].T, rhs[::seq_len], alpha=2.0 * (self.first_token_weight - 1.0) / total)
        return total

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        rows, seq_len = _rows(x)
        self._check(rows)
        self._allocate(rows.device)
        self.weight_sum = self._accumulate(self.hessian, rows, rows, seq_len)
        self.n_tokens += rows.shape[0]
        return x

    def _weighted_sums(self) -> list[torch.Tensor]:
        return [self.hessian]

    def sync(self) -> None:
        """Merge the running means of every process (`qfx.distributed`): each weighted by its
        ranks' token weight, so the result is the mean over all their tokens."""
        if not distributed.active():
            return
        self._allocate(self.hessian.device if self.hessian.numel() else torch.device("cpu"))
        counts = distributed.reduce_(torch.tensor([self.weight_sum, float(self.n_tokens)], dtype=torch.float64))
        for buf in self._weighted_sums():
            buf.mul_(self.weight_sum / max(float(counts[0]), 1e-30))
            distributed.reduce_(buf)
        self.weight_sum, self.n_tokens = float(counts[0]), int(counts[1])

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
        rows, seq_len = _rows(x)
        fp_rows, _ = _rows(self._fp_rows)
        self._check(rows)
        self._check(fp_rows)
        self._allocate(rows.device)
        fp_rows = fp_rows.to(rows.device) - rows  # X - X~
        self._accumulate(self.delta_cross, fp_rows, rows, seq_len)
        self.weight_sum = self._accumulate(self.hessian, rows, rows, seq_len)
        self.n_tokens += rows.shape[0]
        self._fp_rows = None
        return x

    def _allocate(self, device: torch.device) -> None:
        super()._allocate(device)
        if self.delta_cross.numel() == 0:
            self.delta_cross = torch.zeros_like(self.hessian)

    def _weighted_sums(self) -> list[torch.Tensor]:
        return [self.hessian, self.delta_cross]

    def release(self) -> None:
        super().release()
        self.delta_cross = torch.empty(0, device=self.delta_cross.device)
