"""GPTQ against the one-column-at-a-time OBQ update it is derived from (explicit inverse
Hessian, downdated after every column), computed independently in float64."""

import pytest
import torch

from qfx import primitives as P
from qfx.algorithms.gptq import HessianError, gptq_quantize


def obq_reference(w, h, bits, sym, group, damp):
    """Quantize columns left to right; after each, spread its error with the inverse Hessian
    of the remaining columns and remove the column from that inverse (the OBQ downdate)."""
    w = w.double().clone()
    h = h.double() + damp * torch.diag(h.double()).mean() * torch.eye(h.shape[0], dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    n, k = w.shape
    codes = torch.zeros(n, k, dtype=torch.uint8)
    deq = torch.zeros(n, k, dtype=torch.float64)
    qmin, qmax = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if sym else (0, (1 << bits) - 1)
    scale = zero = None
    for c in range(k):
        if c % group == 0:  # group range from the current (error-updated) weights
            blk = w[:, c : c + group]
            lo, hi = blk.min(1).values.clamp(max=0), blk.max(1).values.clamp(min=0)
            if sym:
                scale = torch.maximum(lo / qmin, hi / qmax).clamp(min=1e-12)  # neither end clipped
                zero = torch.zeros(n, dtype=torch.float64) - qmin  # codes are stored offset by 2^(b-1)
            else:
                scale = ((hi - lo) / (qmax - qmin)).clamp(min=1e-12)
                zero = torch.clamp(torch.round(-lo / scale), qmin, qmax)
        q = torch.clamp(torch.round(w[:, c] / scale) + (0 if sym else zero), qmin, qmax)
        codes[:, c] = (q - qmin if sym else q).to(torch.uint8)
        dq = (q - (0 if sym else zero)) * scale
        deq[:, c] = dq
        e = (w[:, c] - dq) / hinv[c, c]
        w[:, c:] -= e.unsqueeze(1) * hinv[c, c:].unsqueeze(0)
        hinv = hinv - hinv[:, c : c + 1] @ hinv[c : c + 1, :] / hinv[c, c]  # remove column c
    return codes, deq


def _problem(n, k, seed, tokens=512):
    g = torch.Generator().manual_seed(seed)
    # correlated inputs with a few large channels, as in real activations
    x = torch.randn(tokens, k, generator=g) @ (torch.eye(k) + 0.3 * torch.randn(k, k, generator=g))
    x[:, :3] *= 8
    w = torch.randn(n, k, generator=g)
    return w, 2 * x.T @ x / tokens, x


def _proxy_loss(w, codes, scale, zero, bits, group, x):
    dq = P.dequantize_weight(codes, scale, zero, bits, group)
    return float(((x @ (w - dq).T) ** 2).mean())


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("block", [128, 5])  # lazy batches spanning or cutting groups must not matter
def test_matches_obq_reference(sym, block):
    w, h, x = _problem(6, 40, seed=1)
    codes, scale, zero = gptq_quantize(w.double(), h.double(), 4, sym, 8, damp=0.01, block_size=block)
    ref_codes, ref_deq = obq_reference(w, h, 4, sym, 8, damp=0.01)
    # same algorithm, different arithmetic: a value within rounding of a .5 boundary may round
    # the other way (BLAS differences suffice), and error feedback carries the flip into later
    # columns; so codes agree almost everywhere and the layer-output error matches
    assert (codes != ref_codes).float().mean() < 0.05
    def loss(deq):
        return float(((x.double() @ (w.double() - deq).T) ** 2).mean())

    ours = loss(P.dequantize_weight(codes, scale.double(), zero, 4, 8).double())
    theirs = loss(ref_deq)
    assert abs(ours - theirs) / theirs < 0.05, (ours, theirs)


@pytest.mark.parametrize("bits, group", [(4, 16), (3, None), (2, 32)])
@pytest.mark.parametrize("act_order", [False, True])
def test_beats_round_to_nearest_on_the_layer_output(bits, group, act_order):
    w, h, x = _problem(32, 64, seed=bits)
    codes, scale, zero = gptq_quantize(w, h, bits, False, group, act_order=act_order)
    rtn_scale, rtn_zero = P.weight_qparams(w, bits, False, group)
    rtn = P.quantize_weight(w, rtn_scale, rtn_zero, bits, group)
    assert _proxy_loss(w, codes, scale, zero, bits, group, x) < 0.8 * _proxy_loss(w, rtn, rtn_scale, rtn_zero, bits,
                                                                                  group, x)


def test_act_order_keeps_groups_contiguous_and_layout_valid():
    w, h, _ = _problem(8, 48, seed=4)
    codes, scale, zero = gptq_quantize(w, h, 4, False, 16, act_order=True)
    assert codes.shape == (8, 48) and scale.shape == (8, 3) and zero.shape == (8, 3)
    assert int(codes.max()) <= 15


def test_dead_inputs_get_zero_weight():
    w, h, _ = _problem(4, 16, seed=5)
    h[3, :] = 0
    h[:, 3] = 0
    codes, scale, zero = gptq_quantize(w, h, 8, True, None)
    assert torch.allclose(P.dequantize_weight(codes, scale, zero, 8, None)[:, 3], torch.zeros(4))


def test_singular_hessian_retries_then_raises():
    h = -torch.eye(8)  # negative definite: no damping ratio of its mean diagonal fixes it
    with pytest.warns(UserWarning, match="not positive definite"), pytest.raises(HessianError):
        gptq_quantize(torch.randn(2, 8), h, 4, True, None)


def _grid_search_reference(w, h_diag, bits, sym, grid, min_shrink):
    """Row by row, shrink by shrink, in float64: the shrink with the least weighted error (first wins ties)."""
    n = w.shape[0]
    scales, zeros = torch.zeros(n, 1, dtype=torch.float64), torch.zeros(n, 1, dtype=torch.float64)
    for r in range(n):
        best = None
        for i in range(grid + 1):
            p = 1.0 - (1.0 - min_shrink) * i / grid
            s, z = P.choose_qparams(w[r : r + 1].min() * p, w[r : r + 1].max() * p, bits, sym)
            dq = P.dequantize(P.quantize(w[r : r + 1], s, z, bits), s, z, bits)
            err = float((((w[r : r + 1] - dq) ** 2) * h_diag).sum())
            if best is None or err < best[0]:
                best = (err, float(s), 0.0 if z is None else float(z))
        scales[r], zeros[r] = best[1], best[2]
    return scales, zeros


@pytest.mark.parametrize("sym", [True, False])
def test_range_search_matches_a_row_by_row_reference(sym):
    from qfx.algorithms.gptq import search_qparams

    g = torch.Generator().manual_seed(3)
    w = torch.randn(12, 32, generator=g, dtype=torch.float64) * torch.rand(12, 1, generator=g, dtype=torch.float64)
    w[:, 5] *= 6  # an outlier column: shrinking the range clips it
    h_diag = torch.rand(32, generator=g, dtype=torch.float64) + 0.1
    scale, zero = search_qparams(w, h_diag, 3, sym, 1.0, grid=10, min_shrink=0.5)
    ref_scale, ref_zero = _grid_search_reference(w, h_diag, 3, sym, 10, 0.5)
    torch.testing.assert_close(scale.double(), ref_scale, rtol=1e-6, atol=0)
    if not sym:
        assert torch.equal(zero.double(), ref_zero)
    # and never worse than min-max, strictly better on some row
    mm_scale, mm_zero = P.choose_qparams(w.amin(1, keepdim=True), w.amax(1, keepdim=True), 3, sym)

    def err(s, z):
        return (((w - P.dequantize(P.quantize(w, s, z, 3), s, z, 3)) ** 2) * h_diag).sum(1)

    assert (err(scale, zero) <= err(mm_scale, mm_zero) + 1e-12).all()
    assert (err(scale, zero) < err(mm_scale, mm_zero) - 1e-9).any()


def test_range_search_lowers_gptq_output_error_at_3_bits():
    w, h, x = _problem(16, 64, seed=4)
    w[:, 7] *= 5
    losses = {}
    for search in (False, True):
        codes, scale, zero = gptq_quantize(w.double(), h.double(), 3, False, 16, act_order=True, range_search=search)
        losses[search] = _proxy_loss(w.double(), codes, scale.double(), zero, 3, 16, x.double())
    assert losses[True] < losses[False]


def test_range_search_of_a_short_last_group_sees_only_its_columns():
    from qfx.algorithms.gptq import search_qparams

    w, h, _ = _problem(8, 70, seed=5)  # groups of 16: the last one has 6 columns
    codes, scale, zero = gptq_quantize(w.double(), h.double(), 3, False, 16, act_order=True, range_search=True)
    s_last, z_last = search_qparams(w.double()[:, 64:], torch.diag(h.double())[64:], 3, False, 1.0)
    torch.testing.assert_close(scale[:, -1:].double(), s_last.double())
    assert torch.equal(zero[:, -1:], z_last)


@pytest.mark.parametrize("act_order", [True, False])  # static groups searched, on-the-fly groups rounded
@pytest.mark.parametrize("sym", [True, False])
def test_scales_held_by_the_model_dtype_are_chosen_before_the_columns(act_order, sym):
    w, h, x = _problem(32, 64, seed=5)
    codes, scale, zero = gptq_quantize(w, h, 4, sym, 16, act_order=act_order, scale_dtype=torch.bfloat16)
    assert torch.equal(scale.bfloat16().float(), scale)
    f_codes, f_scale, f_zero = gptq_quantize(w, h, 4, sym, 16, act_order=act_order)
    exact = _proxy_loss(w, f_codes, f_scale, f_zero, 4, 16, x)
    loss = _proxy_loss(w, codes, scale, zero, 4, 16, x)
    assert loss <= 1.02 * exact  # the stored scales cost GPTQ at most 2 % of its output error here
