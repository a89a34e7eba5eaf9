"""Summaries of repeated measurements: medians with their spread, ratios, goal verdicts."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Summary:
    median: float
    low: float
    high: float
    n: int

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Summary:
        return cls(**data)


def summarize(values: Sequence[float]) -> Summary:
    """Median and min/max of the runs (the machine is noisy: never a single run)."""
    if not values:
        return Summary(float("nan"), float("nan"), float("nan"), 0)
    return Summary(statistics.median(values), min(values), max(values), len(values))


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def verdict(value: float, limit: float, lower_is_better: bool = True) -> str:
    if value != value:  # NaN: not measured
        return "n/a"
    ok = value <= limit if lower_is_better else value >= limit
    return "PASS" if ok else "FAIL"


def seconds(value: float) -> str:
    if value != value:
        return "-"
    if value < 0.01:
        return f"{value * 1000:.2f} ms"
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 100:
        return f"{value:.2f} s"
    return f"{value:.0f} s"


def spread(s: Summary, fmt=seconds) -> str:
    """'1.23 s (1.10-1.40, n=5)'."""
    if not s.n:
        return "-"
    if s.n == 1:
        return f"{fmt(s.median)} (n=1)"
    return f"{fmt(s.median)} ({fmt(s.low)}-{fmt(s.high)}, n={s.n})"
