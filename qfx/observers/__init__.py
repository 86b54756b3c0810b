"""Observers collect statistics during calibration and never change their input."""

from qfx.observers.channel import ChannelStatsObserver
from qfx.observers.hessian import AsymmetricHessianObserver, HessianObserver
from qfx.observers.range import (
    OBSERVER_TYPES,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MSEObserver,
    ObserverError,
    PercentileObserver,
    RangeObserver,
)

__all__ = [
    "AsymmetricHessianObserver",
    "ChannelStatsObserver",
    "OBSERVER_TYPES",
    "HessianObserver",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "MSEObserver",
    "ObserverError",
    "PercentileObserver",
    "RangeObserver",
]
