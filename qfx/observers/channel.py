"""Per-input-channel statistics for scale searches (SmoothQuant, AWQ), and a sample of rows.

For x (..., K): abs max (K,), mean of |x| (K,), and up to `max_rows` rows drawn at fixed
strides from each sequence (for AWQ's clip search, which needs real inputs, not summaries).
Rows are drawn per sequence of x (B, S, K), so batching the calibration samples draws the same
rows as feeding them one at a time.
"""

from __future__ import annotations

import torch

from qfx import distributed
from qfx.observers.range import ObserverError


class ChannelStatsObserver(torch.nn.Module):
    def __init__(self, in_features: int, name: str = "", rows_per_sequence: int = 64, max_rows: int = 2048) -> None:
        super().__init__()
        self.name = name
        self.rows_per_sequence = rows_per_sequence
        self.max_rows = max_rows
        self.register_buffer("abs_max", torch.zeros(in_features))
        self.register_buffer("abs_sum", torch.zeros(in_features, dtype=torch.float64))
        self.n_tokens = 0
        self.rows: list[torch.Tensor] = []
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        rows = x.detach().reshape(-1, x.shape[-1]).float()
        if not torch.isfinite(rows).all():
            raise ObserverError(f"non-finite values (NaN/inf) in calibration activations at {self.name or '?'}")
        a = rows.abs()
        self.abs_max = torch.maximum(self.abs_max.to(a.device), a.amax(0))
        self.abs_sum = self.abs_sum.to(a.device) + a.sum(0, dtype=torch.float64)
        self.n_tokens += rows.shape[0]
        if sum(r.shape[0] for r in self.rows) < self.max_rows:
            seqs = rows.reshape(-1, x.shape[-2] if x.dim() > 2 else rows.shape[0], rows.shape[-1])  # (B, S, K)
            stride = max(1, seqs.shape[1] // self.rows_per_sequence)
            picked = seqs[:, ::stride][:, : self.rows_per_sequence].reshape(-1, rows.shape[-1])
            self.rows.append(picked[: self.max_rows - sum(r.shape[0] for r in self.rows)].clone())
        return x

    def sync(self) -> None:
        """Merge every process's statistics (`qfx.distributed`); rows are taken in rank order,
        as one process given all the batches would have drawn them."""
        if not distributed.active():
            return
        distributed.reduce_(self.abs_max, "max")
        distributed.reduce_(self.abs_sum)
        self.n_tokens = int(distributed.sum_float(float(self.n_tokens)))
        device = self.abs_max.device
        rows = [r.to(device) for part in distributed.gather(self.rows) for r in part]
        self.rows = [torch.cat(rows)[: self.max_rows]] if rows else []

    def abs_mean(self) -> torch.Tensor:
        if self.n_tokens == 0:
            raise ObserverError(f"observer at {self.name or '?'} saw no data; run calibration batches first")
        return (self.abs_sum / self.n_tokens).float()

    def sample(self) -> torch.Tensor:
        """Sampled input rows (n, K) float32."""
        return torch.cat(self.rows)[: self.max_rows]

    def release(self) -> None:
        self.rows = []
