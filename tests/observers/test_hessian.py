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
