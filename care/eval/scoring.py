"""Log-likelihood multiple-choice scoring (as lm-evaluation-harness does) and accuracy with a Wilson 95% CI."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from care.eval.backends import Backend
from care.eval.benchmarks import LETTERS, MCItem, build_prompt, continuations
from care.stats import wilson_ci


def accuracy_summary(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy, its Wilson CI and item count, overall and per subject."""
    def summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        k = sum(1 for r in rows if r["correct"])
        lo, hi = wilson_ci(k, len(rows))
        return {"accuracy": k / len(rows) if rows else 0.0, "ci95": [lo, hi], "correct": k, "n": len(rows)}

    subjects: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        subjects.setdefault(r["subject"], []).append(r)
    return {**summary(records), "subjects": {s: summary(rows) for s, rows in sorted(subjects.items())}}


def score_item(backend: Backend, item: MCItem) -> dict[str, Any]:
    lls = backend.loglikelihoods(build_prompt(item), continuations(item))
    pred = max(range(len(lls)), key=lambda i: lls[i])
    return {"id": item.id, "subject": item.subject, "answer": LETTERS[item.answer], "pred": LETTERS[pred],
            "correct": pred == item.answer, "loglik": [round(x, 6) for x in lls]}


def score_benchmark(backend: Backend, items: Sequence[MCItem],
                    progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Score every item; `progress(1)` is called after each (for a progress bar)."""
    t0 = time.perf_counter()
    backend.truncated = 0
    records = []
    for item in items:
        records.append(score_item(backend, item))
        if progress:
            progress(1)
    elapsed = time.perf_counter() - t0
    return {**accuracy_summary(records), "elapsed_s": round(elapsed, 3),
            "items_per_s": round(len(records) / elapsed, 3) if elapsed > 0 else None,
            "truncated_contexts": backend.truncated, "items": records}
