import pytest
import torch

from qfx.observers import HessianObserver, ObserverError


def test_hessian_is_mean_of_2xtx_over_all_tokens():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 5, 8, generator=g, dtype=torch.float64) for _ in range(3)]
    obs = HessianObserver(8)
    for b in batches:
        assert obs(b) is b
    rows = torch.cat([b.reshape(-1, 8) for b in batches])
    expected = 2.0 * rows.T @ rows / rows.shape[0]
    torch.testing.assert_close(obs.hessian.double(), expected, rtol=1e-5, atol=1e-5)
    assert obs.n_tokens == 30


def test_hessian_refuses_nan():
    with pytest.raises(ObserverError, match="non-finite"):
        HessianObserver(2, name="fc1")(torch.tensor([[1.0, float("inf")]]))


def test_first_token_of_each_window_counts_first_token_weight_times():
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(2, 6, 4, generator=g) for _ in range(2)]
    obs = HessianObserver(4, first_token_weight=5.0)
    for b in batches:
        obs(b)
    rows = torch.cat([b.reshape(-1, 4) for b in batches]).double()
    w = torch.ones(4, 6, dtype=torch.float64)
    w[:, 0] = 5.0
    w = w.reshape(-1, 1)
    expected = 2.0 * (rows * w).T @ rows / w.sum()
    torch.testing.assert_close(obs.hessian.double(), expected, rtol=1e-5, atol=1e-6)


def test_disabled_observer_collects_nothing():
    obs = HessianObserver(3)
    obs.enabled = False
    obs(torch.ones(2, 3))
    assert obs.n_tokens == 0 and not obs.hessian.any()


def test_asymmetric_observer_pairs_full_precision_and_quantized_inputs():
    from qfx.observers import AsymmetricHessianObserver

    g = torch.Generator().manual_seed(2)
    obs = AsymmetricHessianObserver(4)
    fps, qs = [], []
    for _ in range(3):
        fp, q = torch.randn(1, 5, 4, generator=g), torch.randn(1, 5, 4, generator=g)
        obs.mode = "fp"
        obs(fp)
        obs.mode = "q"
        obs(q)
        fps.append(fp.reshape(-1, 4)), qs.append(q.reshape(-1, 4))
    x, xq = torch.cat(fps).double(), torch.cat(qs).double()
    torch.testing.assert_close(obs.hessian.double(), 2 * xq.T @ xq / 15, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(obs.delta_cross.double(), 2 * (x - xq).T @ xq / 15, rtol=1e-5, atol=1e-6)
    with pytest.raises(ObserverError, match="full-precision input"):
        obs(torch.randn(1, 5, 4))  # a quantized batch without its twin
