"""Latency statistics and the repeatability rule the report states: :func:`latency_stats`
(median, p10/p90, spread in ms from timed runs) and :func:`medians_consistent` (two medians
agree when they differ by at most the larger stated spread)."""

from __future__ import annotations

import numpy as np


def latency_stats(seconds: list[float]) -> dict:
    """Median, p10/p90, mean, min/max in ms; ``spread`` is the p10–p90 width (the noise band)."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    p10, median, p90 = (float(v) for v in np.percentile(ms, [10, 50, 90]))
    return {
        "median": median,
        "p10": p10,
        "p90": p90,
        "mean": float(ms.mean()),
        "min": float(ms.min()),
        "max": float(ms.max()),
        "spread": p90 - p10,
        "runs": int(ms.size),
    }


def medians_consistent(a: dict, b: dict) -> bool:
    """Two measurements agree when their medians differ by at most the larger stated spread.

    This is the rule ``tome-export report`` applies to repeated runs of one configuration
    (its "median ± spread" column): a difference inside the stated noise is noise, not a
    speed change."""
    return abs(a["median"] - b["median"]) <= max(a["spread"], b["spread"])
