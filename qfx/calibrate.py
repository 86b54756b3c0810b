"""Run calibration batches through a prepared graph so its observers collect statistics.

This version runs the whole graph per batch; the block-by-block driver (quantized outputs of
block i feeding block i+1, one block on the device at a time) builds on it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.fx import GraphModule
from tqdm.auto import tqdm


def calibrate(prepared: GraphModule, batches: Iterable[torch.Tensor], progress: bool = True) -> int:
    """Feed each batch (token ids (B, S)) through `prepared`; returns the number of tokens seen."""
    device = _device_of(prepared)
    tokens = 0
    with torch.no_grad():
        for batch in tqdm(batches, desc="calibrate", unit="batch", disable=not progress):
            batch = batch.to(device)
            prepared(batch)
            tokens += batch.numel()
    if tokens == 0:
        raise ValueError("calibration got no batches; give at least one sample")
    return tokens


def _device_of(gm: torch.nn.Module) -> torch.device:
    for t in gm.parameters():
        return t.device
    for t in gm.buffers():
        return t.device
    return torch.device("cpu")
