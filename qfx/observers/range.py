"""Range observers: pass the input through, collect what a static scale needs.

Each observer sees tensors (..., K) and keeps a per-tensor range (min, max). `qparams(spec)`
turns the range into a scale via `qfx.primitives`, so the math lives in one place.
"""

from __future__ import annotations

import torch

from qfx import distributed
from qfx import primitives as P


class ObserverError(RuntimeError):
    """Calibration data that cannot give a range (non-finite values, nothing observed)."""


class RangeObserver(torch.nn.Module):
    """Base: running min/max of everything seen. Subclasses change how a batch updates it."""

    def __init__(self, name: str = "") -> None:
        super().__init__()
        self.name = name  # module path of the consumer, for error messages
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))
        self.calls = 0
        self.enabled = True  # the block-wise driver switches observers on only for the passes that need them

    def batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.amin(), x.amax()

    def merge(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        self.min_val = torch.minimum(self.min_val, lo)
        self.max_val = torch.maximum(self.max_val, hi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        xd = x.detach().float()
        if not torch.isfinite(xd).all():
            raise ObserverError(
                f"non-finite values (NaN/inf) in calibration activations at {self.name or 'an observer'}; "
                "check the model in this dtype, or calibrate in float32"
            )
        lo, hi = self.batch_range(xd)
        self.merge(lo.to(self.min_val.device), hi.to(self.max_val.device))
        self.calls += 1
        return x

    def sync(self) -> None:
        """Merge every process's range (`qfx.distributed`)."""
        if not distributed.active():
            return
        self.min_val = distributed.reduce_(self.min_val.clone(), "min")
        self.max_val = distributed.reduce_(self.max_val.clone(), "max")
        self.calls = int(distributed.sum_float(float(self.calls)))

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.calls == 0:
            raise ObserverError(f"observer at {self.name or '?'} saw no data; run calibration batches first")
        return self.min_val, self.max_val

    def symmetric_scale(self, bits: int, clip_ratio: float = 1.0) -> torch.Tensor:
        lo, hi = self.range()
        scale, _ = P.choose_qparams(lo * clip_ratio, hi * clip_ratio, bits, symmetric=True)
        return scale


class MinMaxObserver(RangeObserver):
    """Global min and max over all calibration data."""


class MovingAverageMinMaxObserver(RangeObserver):
    """Exponential moving average of per-batch min/max (less sensitive to one outlier batch)."""

    def __init__(self, name: str = "", momentum: float = 0.1) -> None:
        super().__init__(name)
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum={momentum}: must be in (0, 1]")
        self.momentum = momentum

    def sync(self) -> None:
        if distributed.active():
            raise ObserverError(f"{self.name or '?'}: a moving average depends on the order of batches, which "
                                "several processes do not keep; use the minmax, percentile or mse observer")

    def merge(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        if self.calls == 0:
            self.min_val, self.max_val = lo, hi
        else:
            m = self.momentum
            self.min_val = (1 - m) * self.min_val + m * lo
            self.max_val = (1 - m) * self.max_val + m * hi


class PercentileObserver(RangeObserver):
    """Range from the `q` and `1-q` quantiles of each batch, averaged over batches."""

    def __init__(self, name: str = "", q: float = 0.9999, max_samples: int = 1 << 20) -> None:
        super().__init__(name)
        if not 0.5 < q <= 1.0:
            raise ValueError(f"q={q}: must be in (0.5, 1]")
        self.q, self.max_samples = q, max_samples
        self.register_buffer("sum_lo", torch.tensor(0.0))
        self.register_buffer("sum_hi", torch.tensor(0.0))

    def batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = x.reshape(-1)
        if flat.numel() > self.max_samples:  # torch.quantile has an input size limit
            idx = torch.linspace(0, flat.numel() - 1, self.max_samples, device=flat.device).long()
            flat = flat.sort().values[idx]
        return torch.quantile(flat, 1 - self.q), torch.quantile(flat, self.q)

    def merge(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        self.sum_lo = self.sum_lo + lo
        self.sum_hi = self.sum_hi + hi
        n = self.calls + 1
        self.min_val, self.max_val = self.sum_lo / n, self.sum_hi / n

    def sync(self) -> None:
        if not distributed.active():
            return
        self.sum_lo = distributed.reduce_(self.sum_lo.clone())
        self.sum_hi = distributed.reduce_(self.sum_hi.clone())
        self.calls = int(distributed.sum_float(float(self.calls)))
        self.min_val, self.max_val = self.sum_lo / self.calls, self.sum_hi / self.calls


class MSEObserver(MinMaxObserver):
    """Min-max range, then a search over clip ratios minimising the quantization MSE.

    Keeps a bounded sample of the data to score candidate ranges against.
    """

    def __init__(self, name: str = "", grid: int = 20, min_ratio: float = 0.5, max_samples: int = 1 << 16) -> None:
        super().__init__(name)
        self.grid, self.min_ratio, self.max_samples = grid, min_ratio, max_samples
        self.samples: list[torch.Tensor] = []

    def batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = x.reshape(-1)
        step = max(1, flat.numel() // self.max_samples)
        self.samples.append(flat[::step][: self.max_samples].cpu())
        return super().batch_range(x)

    def sync(self) -> None:
        super().sync()
        if distributed.active():
            self.samples = [t for part in distributed.gather(self.samples) for t in part]

    def best_clip_ratio(self, bits: int) -> float:
        lo, hi = self.range()
        data = torch.cat(self.samples)
        best, best_err = 1.0, float("inf")
        for i in range(self.grid):
            r = 1.0 - (1.0 - self.min_ratio) * i / max(1, self.grid - 1)
            scale, _ = P.choose_qparams(lo.cpu() * r, hi.cpu() * r, bits, symmetric=True)
            q = P.quantize_per_tensor_static(data, scale, bits)
            err = (q.float() * scale - data).pow(2).mean().item()
            if err < best_err:
                best, best_err = r, err
        return best

    def symmetric_scale(self, bits: int, clip_ratio: float = 1.0) -> torch.Tensor:
        return super().symmetric_scale(bits, clip_ratio * self.best_clip_ratio(bits))


OBSERVER_TYPES: dict[str, type[RangeObserver]] = {
    "minmax": MinMaxObserver,
    "moving_average": MovingAverageMinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
}
