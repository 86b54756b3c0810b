"""Triton kernels for the qfx ops on CUDA, each with a plain-PyTorch `*_ref` it is tested against.

- `layout`: weights re-laid out once, at compile time, into what the kernels read.
- `wint_a16`: weight-only GEMM (int 2/3/4/8-bit group-wise, or fp8 per channel) with bf16/fp16
  activations; split-K for small M.
- `act_quant_gemm`: int8 or fp8 activations quantized per token inside the GEMM (two passes over
  each row block of x: absmax, then quantize tiles as they are loaded), int8 / int4 / fp8 weights.
- `split_k`: split-K partials added up by the last program of each output tile.
- `tuning`: explicit config lists by M bucket, timed once per shape and cached per GPU.

Every kernel also runs under `TRITON_INTERPRET=1` on CPU tensors, which is how CI checks them.
"""

from __future__ import annotations

import os


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (set before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
