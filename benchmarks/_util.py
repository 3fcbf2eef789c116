"""Shared helpers for the benchmark scripts (each prints one JSON object)."""

from __future__ import annotations

import json
import statistics
import sys
from typing import Any


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by nearest rank."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(q / 100 * (len(s) - 1))))
    return s[k]


def summary(values: list[float], unit_scale: float = 1000.0) -> dict[str, float]:
    """p50/p99/min/max/mean of seconds, in milliseconds by default."""
    return {
        "n": len(values),
        "p50": round(pct(values, 50) * unit_scale, 3),
        "p99": round(pct(values, 99) * unit_scale, 3),
        "min": round(min(values) * unit_scale, 3),
        "max": round(max(values) * unit_scale, 3),
        "mean": round(statistics.fmean(values) * unit_scale, 3),
    }


def emit(obj: dict[str, Any]) -> None:
    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")
