import pytest
import torch

from qfx import primitives as P
from qfx.algorithms.awq import awq_scale, clip_search
from qfx.config import weight_spec


def test_scale_is_normalised_power_of_mean_magnitude():
    m = torch.tensor([0.5, 2.0, 8.0])
    s = awq_scale(m, 0.5)
    raw = m.double().sqrt()
    torch.testing.assert_close(s, raw / (raw.max() * raw.min()).sqrt())
    torch.testing.assert_close(awq_scale(m, 0.0), torch.ones(3, dtype=torch.float64))


def _reference_clip(w, x, spec, ratios):
    """Brute force per (row, group): try each ratio, keep the least output error."""
    g = spec.group_size
    out = w.clone()
    for r in range(w.shape[0]):
        for c0 in range(0, w.shape[1], g):
            wg, xg = w[r, c0 : c0 + g], x[:, c0 : c0 + g]
            best = None
            for ratio in ratios:
                lo, hi = wg.min() * ratio, wg.max() * ratio
                if spec.symmetric:
                    lo, hi = -wg.abs().max() * ratio, wg.abs().max() * ratio
                scale, zero = P.choose_qparams(lo, hi, spec.bits, spec.symmetric)
                q = P.dequantize(P.quantize(wg.clamp(lo, hi), scale, zero, spec.bits), scale, zero, spec.bits)
                err = float((xg @ (q - wg)).pow(2).mean())
                if best is None or err < best[0]:
                    best = (err, wg.clamp(lo, hi))
            out[r, c0 : c0 + g] = best[1]
    return out


@pytest.mark.parametrize("sym", [True, False])
def test_clip_search_matches_brute_force(sym):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 32, generator=g)
    w[:, 5] *= 6  # an outlier weight per row: clipping it can pay off
    x = torch.randn(64, 32, generator=g)
    spec = weight_spec(3, 16, sym)
    ratios = [1 - 0.5 * i / 20 for i in range(21)]
    torch.testing.assert_close(clip_search(w, x, spec), _reference_clip(w, x, spec, ratios))


def test_asymmetric_clip_is_never_worse():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 64, generator=g) + 0.3
    x = torch.randn(128, 64, generator=g)
    spec = weight_spec(3, 32, False)

    def err(wc):
        q = P.fake_quantize_weight(wc, 3, False, 32)
        return float((x @ (q - w).T).pow(2).sum())

    joint, both = clip_search(w, x, spec), clip_search(w, x, spec, asymmetric=True)
    assert err(both) <= err(joint) + 1e-6 and err(joint) <= err(w) + 1e-6


def test_search_scale_returns_the_grid_scale_with_the_least_block_error():
    from qfx.algorithms.awq import awq_scale, scale_ratios, search_scale

    mean = torch.tensor([1.0, 4.0, 2.0])
    target = scale_ratios()[7]
    seen = []

    def block_error(s):  # s[1] = 2^r for this mean: the error is least at the target ratio
        seen.append(s)
        return float((torch.log2(s[1]) - target) ** 2)

    def tie(s):  # channels 0 and 2 share a scale; applied before the error is measured
        return torch.stack([s[0], s[1], s[0]])

    best = search_scale(mean, tie, block_error)
    torch.testing.assert_close(best, tie(awq_scale(mean, target)), rtol=0, atol=0)
    assert all(s[2] == s[0] for s in seen)
    assert len(seen) == len(scale_ratios())
