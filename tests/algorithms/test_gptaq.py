"""GPTAQ: the starting point is the least-squares map from quantized inputs to full-precision
outputs, and the quantized result fits those outputs better than GPTQ's."""

import torch

from qfx import primitives as P
from qfx.algorithms.gptaq import asymmetric_target
from qfx.algorithms.gptq import gptq_quantize


def _problem(seed=0, n=16, k=32, tokens=400):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=g, dtype=torch.float64) @ (torch.eye(k, dtype=torch.float64)
                                                                     + 0.3 * torch.randn(k, k, generator=g, dtype=torch.float64))
    xq = x + 0.3 * torch.randn(tokens, k, generator=g, dtype=torch.float64)  # inputs after upstream quantization
    w = torch.randn(n, k, generator=g, dtype=torch.float64)
    h = 2 * xq.T @ xq / tokens
    d = 2 * (x - xq).T @ xq / tokens
    return w, x, xq, h, d


def test_target_is_the_least_squares_solution():
    w, x, xq, h, d = _problem()
    target = asymmetric_target(w, h, d, damp=1e-12, alpha=1.0)
    lstsq = torch.linalg.lstsq(xq, x @ w.T).solution.T  # argmin_Q ||xq Q^T - x W^T||
    torch.testing.assert_close(target, lstsq, rtol=1e-7, atol=1e-7)


def test_alpha_zero_is_gptq():
    w, _, _, h, d = _problem(1)
    torch.testing.assert_close(asymmetric_target(w, h, d, 0.01, alpha=0.0), w, rtol=0, atol=0)


def test_gptaq_fits_full_precision_outputs_better_than_gptq():
    w, x, xq, h, d = _problem(2)
    errs = {}
    for name, start in (("gptq", w), ("gptaq", asymmetric_target(w, h, d, 0.01, alpha=1.0))):
        codes, scale, zero = gptq_quantize(start, h, 4, False, 16)
        q = P.dequantize_weight(codes, scale, zero, 4, 16).double()
        errs[name] = float((xq @ q.T - x @ w.T).pow(2).sum())
    assert errs["gptaq"] < 0.9 * errs["gptq"], errs
