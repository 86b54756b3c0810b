"""Split-K without extra kernels: the last program of each output tile adds up the partials.

A split-K GEMM has SPLIT_K programs per output tile, each summing a slice of K. Adding their
float32 partials atomically into y needs y zeroed first and cast to x's dtype after: two more
kernels per call, a few microseconds each, which at decode sizes cost as much as the GEMM.
Instead each program stores its partial in a (SPLIT_K, M, N) float32 workspace and counts
itself in on the tile's counter (an atomic add, acquire-release at GPU scope); the program
that arrives last reads every partial back, writes y in its dtype and sets the counter back to
zero, so the counters are zero again for the next call without a memset.

The counters live in one zeroed int32 buffer per device. The backend makes it when it lowers
a linear, at compile time: made on first use inside torch.compile's CUDA-graph warm-up, it
would be an allocation of the graph's memory pool that outlives the graph. Calls that share
it must not run concurrently on different streams.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qfx.lowering.kernels import interpreting

MAX_TILES = 1 << 16  # output tiles a split call may have (counters: 256 KB per device)
_counters: dict[torch.device, torch.Tensor] = {}


def counters(device: torch.device) -> torch.Tensor:
    """The zeroed int32 tile counters of `device` (MAX_TILES of them)."""
    device = torch.device(device)
    if device not in _counters:
        _counters[device] = torch.zeros(MAX_TILES, dtype=torch.int32, device=device)
    return _counters[device]


def workspace(split_k: int, m: int, n: int, device: torch.device) -> torch.Tensor:
    """(split_k, m, n) float32 partials; every entry is written before it is read."""
    return torch.empty((split_k, m, n), dtype=torch.float32, device=device)


_FENCE = tl.constexpr(not interpreting())  # the interpreter runs programs one after another: nothing to order


@triton.jit
def release_fence():
    """This thread's earlier global writes become visible GPU-wide before its later ones."""
    tl.inline_asm_elementwise("fence.acq_rel.gpu; mov.u32 $0, 0;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def store_tile(acc, y_ptr, offs_m, offs_n, mask_m, mask_n, stride_ym, part_ptr, cnt_ptr, tile, M, N,
               SPLIT_K, SPLIT: tl.constexpr):
    """Write the (BLOCK_M, BLOCK_N) float32 tile `acc` of y, or with SPLIT this program's partial
    of it (program pid_k = program_id(1) of SPLIT_K), the last one to arrive writing y."""
    mask = mask_m[:, None] & mask_n[None, :]
    y = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    if SPLIT:
        part = part_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.store(part + tl.program_id(1) * M * N, acc, mask=mask)
        if _FENCE:  # each thread publishes its part of the partial, then all meet, then one counts
            release_fence()
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            total = tl.zeros(acc.shape, dtype=tl.float32)
            for k in range(SPLIT_K):  # .cg: read at L2, not from a stale L1 line
                total += tl.load(part + k * M * N, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(y, total.to(y_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed", scope="gpu")
    else:
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask)
