"""GPTQ's lazy-batch kernel against the PyTorch loop it replaces, on random problems.

Without a GPU the kernel runs in Triton's interpreter, whose float32 arithmetic is the same
as PyTorch's: codes must agree exactly. Compiled on a GPU, multiply-adds may fuse and a value
within rounding of a .5 boundary may round the other way, after which error feedback carries
the flip along its row: there a small share of codes may differ.
"""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from qfx import primitives as P
from qfx.algorithms.gptq import gptq_block_ref, gptq_quantize, inverse_hessian_cholesky
from qfx.algorithms.gptq_block import gptq_block

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MAX_FLIPPED = 0.0 if DEVICE == "cpu" else 0.01


def _batch(n, width, k, seed):
    """A weight batch (n, width) of a layer with k inputs and the matching inverse-Hessian factor."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * width, width, generator=g) @ (torch.eye(width) + 0.3 * torch.randn(width, width, generator=g))
    x[:, :2] *= 6
    hinv = inverse_hessian_cholesky(2 * x.T @ x / x.shape[0], 0.01)
    return torch.randn(n, width, generator=g), hinv


def _run(fn, w1, hinv1, cols, k, bits, sym, group, static, clip, seed, scale_dtype=None):
    n = w1.shape[0]
    n_groups = P.n_groups(k, group)
    codes = torch.zeros(n, k, dtype=torch.uint8, device=DEVICE)
    g = torch.Generator().manual_seed(seed + 1)
    scale = (torch.rand(n, n_groups, generator=g) * 0.3 + 0.05).to(DEVICE)  # used when static
    zero = None if sym else torch.randint(0, 1 << bits, (n, n_groups), generator=g).to(torch.uint8).to(DEVICE)
    w1 = w1.clone().to(DEVICE)
    err = fn(w1, hinv1.to(DEVICE), cols, codes, scale, zero, bits, sym, group, static, clip, scale_dtype)
    return codes.cpu(), scale.cpu(), None if zero is None else zero.cpu(), err.cpu()


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("bits, group, width, static", [(4, 16, 32, False), (3, 8, 24, False), (4, 40, 40, True),
                                                        (8, 64, 17, True), (2, 5, 15, False)])
def test_kernel_matches_the_pytorch_loop(sym, bits, group, width, static):
    n, k = 19, 80  # rows not a multiple of the kernel's row block
    w1, hinv1 = _batch(n, width, k, seed=bits * width)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(3))[:width] if static else torch.arange(width)
    args = (k, bits, sym, group, static, 0.9 if bits == 3 else 1.0, width)  # ..., clip ratio, seed
    ref = _run(gptq_block_ref, w1, hinv1, perm.tolist(), *args)
    out = _run(gptq_block, w1, hinv1, perm.to(DEVICE), *args)
    touched = perm
    flipped = (out[0][:, touched] != ref[0][:, touched]).float().mean()
    assert flipped <= MAX_FLIPPED
    assert (out[0][:, [c for c in range(k) if c not in set(perm.tolist())]] == 0).all()
    if not static:  # the groups the batch opened got fresh qparams
        groups = sorted({c // group for c in perm.tolist() if c % group == 0})
        torch.testing.assert_close(out[1][:, groups], ref[1][:, groups], rtol=1e-6, atol=0)
        if not sym:
            assert (out[2][:, groups].int() - ref[2][:, groups].int()).abs().max() <= (0 if DEVICE == "cpu" else 1)
    if DEVICE == "cpu":
        torch.testing.assert_close(out[3], ref[3], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sym", [True, False])
def test_kernel_rounds_fresh_scales_like_the_loop(scale_dtype, sym):
    n, k, group, width = 19, 64, 16, 32
    w1, hinv1 = _batch(n, width, k, seed=7)
    args = (k, 4, sym, group, False, 1.0, 7)
    ref = _run(gptq_block_ref, w1, hinv1, list(range(width)), *args, scale_dtype=scale_dtype)
    out = _run(gptq_block, w1, hinv1, torch.arange(width, device=DEVICE), *args, scale_dtype=scale_dtype)
    opened = list(range(width // group))
    assert torch.equal(ref[1][:, opened].to(scale_dtype).float(), ref[1][:, opened])  # held exactly
    torch.testing.assert_close(out[1][:, opened], ref[1][:, opened], rtol=0, atol=0)
    assert (out[0][:, :width] != ref[0][:, :width]).float().mean() <= MAX_FLIPPED
    plain = _run(gptq_block_ref, w1, hinv1, list(range(width)), *args)
    assert not torch.equal(plain[1][:, opened], ref[1][:, opened])  # rounding did change scales


@settings(max_examples=8, deadline=None)
@given(n=st.integers(1, 40), k=st.integers(8, 70), group=st.sampled_from([4, 8, 16, 32]),
       act_order=st.booleans(), sym=st.booleans(), seed=st.integers(0, 1000))
def test_whole_gptq_with_the_kernel_matches_the_loop(n, k, group, act_order, sym, seed):
    """gptq_quantize's CUDA path (kernel per batch) against its CPU path (loop) on one problem."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * k, k, generator=g)
    h, w = 2 * x.T @ x / x.shape[0], torch.randn(n, k, generator=g)
    ref = gptq_quantize(w, h, 4, sym, group, act_order=act_order, block_size=16)
    if DEVICE == "cpu":  # run the kernel path on CPU tensors through the interpreter
        import qfx.algorithms.gptq as gptq

        out = _with_kernel_on_cpu(gptq, lambda: gptq_quantize(w, h, 4, sym, group, act_order=act_order,
                                                               block_size=16))
    else:
        out = tuple(t.cpu() if t is not None else None for t in
                    gptq_quantize(w.cuda(), h.cuda(), 4, sym, group, act_order=act_order, block_size=16))
    assert (out[0] != ref[0]).float().mean() <= MAX_FLIPPED
    torch.testing.assert_close(out[1], ref[1], rtol=1e-5 if DEVICE == "cpu" else 0.05, atol=0)


def _with_kernel_on_cpu(module, fn):
    old = module._use_kernel
    module._use_kernel = lambda w: w.dtype == torch.float32
    try:
        return fn()
    finally:
        module._use_kernel = old
