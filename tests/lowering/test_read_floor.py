"""The kernel benchmark's read-floor kernel reads every word it is timed on.

Under TRITON_INTERPRET=1 without a GPU (set in conftest). Its output, the XOR of each
program's words, is compared with the XOR of the whole array: a word skipped or read twice
(grid stride wrong, mask off by one) changes it.
"""

import functools
import operator
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_kernels  # noqa: E402


@pytest.mark.parametrize("n, programs, block", [(10000, 4, 1024), (5, 3, 1024), (4096, 2, 1024), (3000, 7, 256)])
def test_read_kernel_reads_every_word_once(n, programs, block):
    src = torch.randint(-2**31, 2**31 - 1, (n,), dtype=torch.int32, generator=torch.Generator().manual_seed(n))
    out = torch.zeros(programs, dtype=torch.int32)
    bench_kernels._read_kernel[(programs,)](src, out, n, BLOCK=block)
    assert functools.reduce(operator.xor, out.tolist()) == functools.reduce(operator.xor, src.tolist())
