"""Calibration across processes with torch.distributed (launched by torchrun: NCCL, one process
per GPU; gloo on CPUs): what is split, what is summed, what is shared.

- calibration batches: every rank is given the same list and keeps one contiguous run of it
  (`my_batches`), so rank 0 holds the first samples, as AWQ's scale search and the sampled
  rows of the scale searches expect;
- statistics: each observer's `sync()` merges its state across ranks (sums of Hessians
  weighted by their token counts, minima and maxima, gathered rows);
- AWQ's search losses are summed (`sum_float`);
- GPTQ / GPTAQ solves: rank r solves every world-th group of linears and the results are
  shared (`share`), so every rank ends with the same tensors.
Without an initialised process group of more than one process every function is the identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def _device() -> torch.device:
    """Where collectives run: the current GPU for NCCL, the CPU for gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def my_batches(batches: list) -> tuple[list, int]:
    """This rank's contiguous run of `batches` and the index of its first one."""
    if not active():
        return batches, 0
    if len(batches) < world():
        raise ValueError(f"{len(batches)} calibration batches for {world()} processes: give at least one per process "
                         "(more samples or a smaller calibration batch size)")
    per, extra = divmod(len(batches), world())
    start = rank() * per + min(rank(), extra)
    return batches[start:start + per + (rank() < extra)], start


def reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """`t` reduced over ranks, in place (op: sum, min, max)."""
    if not active():
        return t
    ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
    work = t.to(_device())
    dist.all_reduce(work, ops[op])
    if work is not t:
        t.copy_(work)
    return t


def sum_float(x: float) -> float:
    if not active():
        return x
    return float(reduce_(torch.tensor([x], dtype=torch.float64)))


def gather(obj) -> list:
    """`obj` of every rank, in rank order (tensors travel through the CPU)."""
    if not active():
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, _to_cpu(obj))
    return out


def share(mine: dict) -> dict:
    """The union of every rank's dict (each rank's keys are its own)."""
    merged: dict = {}
    for part in gather(mine):
        merged.update(part)
    return merged


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
