import pytest
import torch

from qfx.observers import (
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MSEObserver,
    ObserverError,
    PercentileObserver,
)


def test_minmax_tracks_global_range_and_passes_input_through():
    obs = MinMaxObserver()
    a, b = torch.tensor([[-1.0, 2.0]]), torch.tensor([[-3.0, 0.5]])
    assert obs(a) is a
    obs(b)
    lo, hi = obs.range()
    assert float(lo) == -3.0 and float(hi) == 2.0
    assert float(obs.symmetric_scale(8)) == pytest.approx(3.0 / 128)  # -3 lands on code -128


def test_moving_average_weights_recent_batches():
    obs = MovingAverageMinMaxObserver(momentum=0.5)
    obs(torch.tensor([-4.0, 4.0]))
    obs(torch.tensor([-2.0, 2.0]))
    lo, hi = obs.range()
    assert float(hi) == pytest.approx(3.0) and float(lo) == pytest.approx(-3.0)


def test_percentile_ignores_a_rare_outlier():
    x = torch.randn(10000)
    x[0] = 1000.0
    obs = PercentileObserver(q=0.999)
    obs(x)
    assert float(obs.range()[1]) < 10.0
    assert float(MinMaxObserver()(x).max()) == 1000.0


def test_mse_observer_clips_heavy_tails():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, generator=g)
    x[:5] = 40.0
    obs = MSEObserver()
    obs(x)
    assert obs.best_clip_ratio(4) < 1.0
    assert float(obs.symmetric_scale(4)) < 40.0 / 7  # the min-max scale: 40 on code 7


@pytest.mark.parametrize("cls", [MinMaxObserver, MovingAverageMinMaxObserver, PercentileObserver, MSEObserver])
def test_non_finite_activations_are_refused(cls):
    obs = cls(name="model.layers.0.mlp.down_proj")
    with pytest.raises(ObserverError, match="non-finite.*down_proj"):
        obs(torch.tensor([1.0, float("nan")]))


def test_observer_without_data_says_so():
    with pytest.raises(ObserverError, match="saw no data"):
        MinMaxObserver(name="q_proj").range()
