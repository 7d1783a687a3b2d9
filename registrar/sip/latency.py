"""A latency histogram kept as plain counters: observing costs one bisect and two additions on the hot path
(measured inside the noise of the throughput bench, docs/benchmarks.md), and the shell exports it as a
Prometheus histogram at scrape time."""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field

# Upper bounds in seconds. An absorbed refresh is answered in tens of microseconds; a relayed one waits for
# the main registrar (milliseconds), or for Timer F (32 s) when main is silent: the last bucket is +Inf.
BOUNDS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


@dataclass(slots=True)
class Histogram:
    """Counts per bucket (not cumulative: one addition per observation) and the sum of what was observed."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(BOUNDS) + 1))
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        if seconds < 0.0:
            seconds = 0.0  # the wall clock stepped back between arrival and answer
        self.counts[bisect_left(BOUNDS, seconds)] += 1
        self.total += seconds

    def cumulative(self) -> list[tuple[str, float]]:
        """(le, count) pairs as Prometheus wants them, ending with +Inf."""
        out: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip((*map(str, BOUNDS), "+Inf"), self.counts, strict=True):
            running += n
            out.append((bound, float(running)))
        return out
