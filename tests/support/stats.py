"""The one percentile definition every benchmark reports, so that figures side by side are computed alike."""

from __future__ import annotations

import math
from collections.abc import Iterable


def percentile(values: Iterable[float], q: float) -> float:
    """Nearest-rank percentile, q in 0..100: the smallest value that at least q % of the values do not exceed,
    i.e. the ⌈q/100 · n⌉-th smallest (the smallest for q = 0). Always one of the values measured, never an
    interpolation: p100 is the maximum, p50 of an even count the lower middle value."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of no values")
    rank = math.ceil(q / 100.0 * len(ordered))
    return ordered[min(len(ordered), max(1, rank)) - 1]
