"""High-level eval runs: every model on the same items, results written after each model (marked incomplete
until the end), then the Markdown report and charts."""

from __future__ import annotations

import logging
import platform
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from care.eval import report
from care.eval.backends import Backend, open_backend
from care.eval.benchmarks import load_benchmark, parse_bench_names

log = logging.getLogger(__name__)

# Bump when build_prompt() changes: results with different prompts must not be compared silently.
PROMPT_VERSION = 1

ProgressFactory = Callable[[str, int], Callable[[int], None]]


def _no_progress(_desc: str, _total: int) -> Callable[[int], None]:
    return lambda _n: None


def _unique_label(backend: Backend, taken: set[str]) -> str:
    label, i = backend.label, 2
    while label in taken:
        label, i = f"{backend.label}-{i}", i + 1
    backend.label = label
    taken.add(label)
    return label


def run_mc(models: Sequence[str], benches: str | Sequence[str], out: Path, *, data_dir: Path | None,
           shots: int = 0, limit: int | None = None, seed: int = 0, threads: int | None = None, n_ctx: int = 4096,
           medqa_file: Path | None = None, progress: ProgressFactory | None = None) -> tuple[dict[str, Any], dict]:
    progress = progress or _no_progress
    names = parse_bench_names(benches if isinstance(benches, str) else ",".join(benches))
    # Load every benchmark first: a wrong file fails before any model is loaded.
    items = {n: load_benchmark(n, data_dir, shots=shots, limit=limit, seed=seed, medqa_file=medqa_file) for n in names}
    settings = {"benchmarks": names, "shots": shots, "limit": limit, "seed": seed, "threads": threads,
                "n_ctx": n_ctx, "data_dir": str(data_dir) if data_dir else None,
                "medqa_file": str(medqa_file) if medqa_file else None, "prompt_version": PROMPT_VERSION,
                "scoring": "log-likelihood of ' A', ' B', ... after 'Answer:' (lm-evaluation-harness style)",
                "python": platform.python_version(), "complete": False,
                "item_ids": {n: [it.id for it in its] for n, its in items.items()}}
    results = report.new_results("mc", settings)
    return _run_models(models, results, Path(out), {n: len(items[n]) for n in names},
                       lambda backend, name, tick: _score(backend, items[name], tick),
                       threads=threads, n_ctx=n_ctx, progress=progress)


def _run_models(models: Sequence[str], results: dict[str, Any], out: Path, sizes: dict[str, int],
                run_one: Callable[[Backend, str, Callable[[int], None]], dict[str, Any]], *,
                threads: int | None, n_ctx: int, progress: ProgressFactory) -> tuple[dict[str, Any], dict]:
    """Open each model in turn, run every set on it, and rewrite results.json after each set, so an
    interrupted run keeps what finished."""
    taken: set[str] = set()
    for spec in models:
        backend = open_backend(spec, threads=threads, n_ctx=n_ctx)
        try:
            label = _unique_label(backend, taken)
            results["models"].append(backend.describe())
            results["results"][label] = {}
            for name, size in sizes.items():
                results["results"][label][name] = run_one(backend, name, progress(f"{label} · {name}", size))
                report.write_json(out / "results.json", results)
        finally:
            backend.close()
    results["settings"]["complete"] = True
    return results, report.write_report(results, out)


def _score(backend: Backend, items, tick) -> dict[str, Any]:
    from care.eval.scoring import score_benchmark

    return score_benchmark(backend, items, tick)


def run_generate(models: Sequence[str], sets: Sequence[str], out: Path, *, data_dir: Path | None,
                 limit: int | None = 20, seed: int = 0, max_tokens: int = 256, threads: int | None = None,
                 n_ctx: int = 4096, bertscore: bool = True, progress: ProgressFactory | None = None
                 ) -> tuple[dict[str, Any], dict]:
    from care.eval import metrics
    from care.eval.generation import load_gen_set, run_generation

    progress = progress or _no_progress
    pairs = {s: load_gen_set(s, data_dir, limit=limit, seed=seed) for s in sets}
    scorer = metrics.BERTScorer() if bertscore else None
    settings = {"sets": list(sets), "limit": limit, "seed": seed, "max_tokens": max_tokens, "threads": threads,
                "n_ctx": n_ctx, "decoding": "greedy", "data_dir": str(data_dir) if data_dir else None,
                "bertscore_encoder": metrics.BERTSCORE_ENCODER if bertscore else None,
                "bertscore_note": metrics.BERTSCORE_NOTE if bertscore else None, "complete": False,
                "item_ids": {s: [p["id"] for p in ps] for s, ps in pairs.items()}}
    results = report.new_results("generation", settings)
    return _run_models(models, results, Path(out), {s: len(pairs[s]) for s in sets},
                       lambda backend, s, tick: run_generation(backend, pairs[s], max_tokens=max_tokens,
                                                               bertscorer=scorer, progress=tick),
                       threads=threads, n_ctx=n_ctx, progress=progress)
