"""Benchmark scripts (run as `python bench/<name>.py`) and the helpers they share."""

import statistics


def quartiles(xs: list[float]) -> dict:
    """Median and quartiles of repeated timings (inclusive method: with a few repeats, the quartiles stay within
    the measured range)."""
    xs = sorted(xs)
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return {"median": q[1], "q1": q[0], "q3": q[2], "n": len(xs)}
