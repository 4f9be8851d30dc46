"""Percentiles, medians and the one-line JSON records every scenario writes.

Latencies travel between processes as integer nanoseconds and are reported in milliseconds.
Percentiles use the nearest-rank method on the merged samples (no interpolation), so p99 of
100 samples is the 99th smallest and ``max`` is the largest sample actually observed.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

PERCENTILES = (50, 90, 99)


def percentile(sorted_values: Sequence[int], pct: float) -> int:
    """Nearest-rank percentile of an ascending sequence (which must not be empty)."""
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def latency_summary(samples_ns: Iterable[int], prefix: str = "latency") -> dict[str, float | None]:
    """``{prefix}_p50_ms``, ``_p90_ms``, ``_p99_ms``, ``_max_ms``, ``_samples`` from samples."""
    values = sorted(samples_ns)
    out: dict[str, float | None] = {f"{prefix}_samples": float(len(values))}
    for pct in PERCENTILES:
        out[f"{prefix}_p{pct}_ms"] = round(percentile(values, pct) / 1e6, 3) if values else None
    out[f"{prefix}_max_ms"] = round(values[-1] / 1e6, 3) if values else None
    return out


def median_metrics(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per metric, the median over the runs that reported a number for it."""
    keys: list[str] = []
    for run in runs:
        for key in run:
            if key not in keys:
                keys.append(key)
    out: dict[str, Any] = {}
    for key in keys:
        values = [
            run[key]
            for run in runs
            if isinstance(run.get(key), int | float) and not isinstance(run.get(key), bool)
        ]
        out[key] = round(float(statistics.median(values)), 4) if values else None
    return out


def merge_counts(dicts: Iterable[Mapping[str, int]]) -> dict[str, int]:
    """Sum several ``{name: count}`` maps (close codes, failure reasons, status words)."""
    total: dict[str, int] = {}
    for d in dicts:
        for key, value in d.items():
            total[str(key)] = total.get(str(key), 0) + int(value)
    return dict(sorted(total.items()))
