"""Observers collect statistics during calibration and never change their input."""

from qfx.observers.hessian import HessianObserver
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
    "OBSERVER_TYPES",
    "HessianObserver",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "MSEObserver",
    "ObserverError",
    "PercentileObserver",
    "RangeObserver",
]
