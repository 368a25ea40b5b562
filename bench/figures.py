"""The figure type every suite returns, and small statistics helpers."""

from __future__ import annotations

import statistics
from typing import TypedDict


class Figure(TypedDict):
    """One measured number and its unit."""

    value: float
    unit: str


Figures = dict[str, Figure]


def figure(value: float, unit: str) -> Figure:
    """Round to a readable precision."""
    return {"value": round(value, 4), "unit": unit}


def median(samples: list[float]) -> float:
    """Return the median: benchmarks report medians because these machines are noisy."""
    return statistics.median(samples)
