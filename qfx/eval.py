"""Perplexity over non-overlapping windows: exp(mean next-token NLL over all predicted tokens)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def perplexity(
    model,
    windows: torch.Tensor,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    progress: bool = True,
    desc: str = "perplexity",
) -> float:
    """Perplexity of `model` (input_ids (B, S) -> logits (B, S, V)) on `windows` (W, S).

    Each window predicts its tokens 1..S-1 from the ones before; NLL is summed in float64.
    """
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be (W, S) with S >= 2, got {tuple(windows.shape)}")
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in tqdm(range(0, windows.shape[0], batch_size), desc=desc, unit="batch", disable=not progress):
            batch = windows[i : i + batch_size]
            if device is not None:
                batch = batch.to(device)
            logits = model(batch)
            logits = logits[:, :-1].float()
            target = batch[:, 1:]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")
            nll += float(loss.double())
            count += target.numel()
    if not math.isfinite(nll):
        raise FloatingPointError("non-finite loss during evaluation: the model produced NaN/inf logits")
    return math.exp(nll / count)
