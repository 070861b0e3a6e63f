"""Proportions with confidence intervals: the one Wilson score interval of the project (eval, bench)."""

from __future__ import annotations

import math

Z95 = 1.959963984540054


def wilson_ci(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; well-behaved at 0, 1 and small n (unlike normal approx)."""
    if n <= 0:
        return (0.0, 0.0)
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def fmt_rate(k: int, n: int) -> str:
    """"0.953 [0.921, 0.972]  (143/150)", or "-" for an empty group."""
    if n <= 0:
        return "-  (0/0)"
    lo, hi = wilson_ci(k, n)
    return f"{k / n:.3f} [{lo:.3f}, {hi:.3f}]  ({k}/{n})"
