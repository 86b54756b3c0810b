import torch

from qfx.algorithms.smoothquant import ALPHA_GRID, region_error, search_alpha, smooth_scales
from qfx.config import act_spec, weight_spec


def test_scales_follow_the_formula():
    a = torch.tensor([1.0, 4.0, 100.0])
    w1 = torch.tensor([[0.5, -2.0, 1.0]])
    w2 = torch.tensor([[-1.0, 1.0, 0.25]])
    s = smooth_scales(a, [w1, w2], 0.5)
    wmax = torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(s, a.double().sqrt() / wmax.sqrt())


def _outlier_problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=g)
    x[:, [3, 17]] *= 60  # activation outlier channels, as in LLMs
    w = torch.randn(48, 64, generator=g) * 0.05
    return x, w


def test_smoothing_lowers_w8a8_error_on_outlier_channels():
    x, w = _outlier_problem()
    wspec, aspec = weight_spec(8, 0), act_spec(8)
    plain = region_error(x, [w], torch.ones(64), wspec, aspec)
    smoothed = region_error(x, [w], smooth_scales(x.abs().amax(0), [w], 0.5), wspec, aspec)
    assert smoothed < 0.5 * plain


def test_alpha_search_picks_the_grid_minimum():
    x, w = _outlier_problem()
    wspec, aspec = weight_spec(4, 16), act_spec(8)
    alpha, s = search_alpha(x.abs().amax(0), x, [w], wspec, aspec)
    errs = {a: region_error(x, [w], smooth_scales(x.abs().amax(0), [w], a), wspec, aspec) for a in ALPHA_GRID}
    assert alpha == min(errs, key=errs.get)
    torch.testing.assert_close(s, smooth_scales(x.abs().amax(0), [w], alpha))
