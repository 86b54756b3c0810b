"""Kernel configs: explicit candidate lists by M bucket, timed once per problem and cached per GPU.

A problem key is (kernel, M bucket, N, K, variant); the M bucket is the next power of two of M
(capped at 4096), so decode (M = 1) and prefill (M = 2048) of one layer tune separately. The
best config is kept in memory and in `$QFX_CACHE_DIR` (default `~/.cache/qfx`) as
`tuning-<gpu>-triton<version>.json`, so a later process on the same GPU model skips the timing.
Under the Triton interpreter, or with `QFX_TUNE=0`, the first candidate runs without timing.

Each candidate is timed as a CUDA-graph replay of one call, after flushing the L2 cache: the
GPU time of the kernels alone, with cold weights, as a decode step that replays a CUDA graph
sees them. Timing plain launches (`triton.testing.do_bench`) measures the Python launch, which
outlasts kernels of a few microseconds, and ranks the configs by that noise.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from qfx.lowering.kernels import interpreting


class Config(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8
    variant: str = "tiled"  # which kernel of a family runs: e.g. "tiled", "gemv", "dequant"


def m_bucket(m: int) -> int:
    return min(1 << max(m - 1, 0).bit_length(), 4096)


_memory: dict[str, dict[str, list]] = {}


def _cache_file() -> Path:
    import triton

    gpu = re.sub(r"[^A-Za-z0-9]+", "_", torch.cuda.get_device_name())
    root = Path(os.environ.get("QFX_CACHE_DIR", Path.home() / ".cache" / "qfx"))
    return root / f"tuning-v2-{gpu}-triton{triton.__version__}.json"  # v2: graph-replay timing


def _load(path: Path) -> dict[str, list]:
    if str(path) not in _memory:
        try:
            _memory[str(path)] = json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, ValueError):
            _memory[str(path)] = {}  # an unreadable cache only costs a re-tune
    return _memory[str(path)]


def _store(path: Path, table: dict[str, list]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
            json.dump(table, f, indent=0, sort_keys=True)
        os.replace(f.name, path)
    except OSError:
        pass  # a read-only home still works, tuning again next process


def graph_time_ms(calls: list[Callable[[], object]], flush: torch.Tensor | None, replays: int = 15) -> float:
    """Median GPU time (ms) of one replay of `calls` (zero-argument callables, in order) captured
    as one CUDA graph. With `flush`, each replay follows `flush.zero_()`, which evicts the L2 and
    keeps the GPU busy while the replay is queued."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in calls:  # compile, tune, allocate
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if flush is not None:
            flush.zero_()
        start.record()
        graph.replay()
        end.record()
        times.append((start, end))
    torch.cuda.synchronize()
    ms = sorted(s.elapsed_time(e) for s, e in times)
    del graph
    return ms[len(ms) // 2]


def pick(key: str, candidates: list[Config], run: Callable[[Config], object]) -> Config:
    """The fastest candidate for `key` (timed with `run(config)` the first time it is asked)."""
    if interpreting() or os.environ.get("QFX_TUNE", "1") == "0" or len(candidates) == 1:
        return candidates[0]
    path = _cache_file()
    table = _load(path)
    if key in table and Config(*table[key]) in candidates:
        return Config(*table[key])
    best, best_ms = None, float("inf")
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")  # 5x an H100's L2
    for cfg in candidates:
        try:
            ms = graph_time_ms([lambda: run(cfg)], flush)
        except Exception:  # e.g. out of shared memory for this tile shape on this GPU
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    if best is None:
        raise RuntimeError(f"no kernel config ran for {key}")
    table[key] = list(best)
    _store(path, table)
    return best
