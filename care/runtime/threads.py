"""CPU counting in one place: the cores this process may use, physical cores, and llama.cpp's default threads."""

from __future__ import annotations

import os


def usable_cpus() -> int:
    """Logical CPUs this process may run on (its affinity mask, e.g. under taskset or a container quota)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def physical_cores() -> int:
    """Physical cores this process may use (SMT siblings are no extra decode speed for llama.cpp)."""
    try:
        import psutil

        n = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        n = os.cpu_count() or 1
    return max(1, min(n, usable_cpus()))


def default_threads() -> int:
    """Idle physical cores (or $CARE_THREADS). llama.cpp's workers spin-wait, so asking for a busy core stalls
    every token."""
    env = os.environ.get("CARE_THREADS")
    if env:
        return max(1, int(env))
    try:
        busy = int(os.getloadavg()[0] + 0.5)
    except OSError:
        busy = 0
    return max(1, physical_cores() - busy)
