"""`care eval run|generate|compare`: medical benchmarks, generation metrics, and the diff of two result files."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

BENCH_HELP = "comma-separated: medmcqa, pubmedqa, mmlu_medical, medqa (needs --medqa-file)"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", action="append", required=True, metavar="[LABEL=]PATH",
                   help="an HF model folder, a .gguf file (or known name), or an ONNX folder; repeat to compare "
                        "several on the same items; LABEL= names it in the report")
    p.add_argument("--limit", type=int, default=None, help="evaluate a seeded random subset of N items per set")
    p.add_argument("--seed", type=int, default=0, help="seed of the subset and of few-shot choices (default 0)")
    p.add_argument("--out", "-o", type=Path, required=True, help="output folder (results.json, report.md, PNGs)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="the public datasets folder (default: ../shared/data beside the checkout, or $CARE_SHARED_DATA)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch / llama.cpp")
    p.add_argument("--n-ctx", type=int, default=4096, help="GGUF context length (default 4096)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="{run,generate,compare}")
    r = sub.add_parser("run", help="multiple-choice benchmarks scored by option log-likelihood",
                       description="Score models on medical multiple-choice benchmarks (log-likelihood of each "
                                   "option letter), with 95% CIs, a Markdown report and charts.")
    _common(r)
    r.add_argument("--bench", "-b", default="medmcqa,pubmedqa,mmlu_medical", help=BENCH_HELP)
    r.add_argument("--shots", "-k", type=int, default=0, help="few-shot examples per question (MMLU: 0..5 from dev)")
    r.add_argument("--medqa-file", type=Path, default=None, help="MedQA-USMLE 4-option jsonl: the original question/options/answer_idx lines or the Hugging Face sent1/ending0-3/label shape")
    r.set_defaults(module_run=run_mc)
    g = sub.add_parser("generate", help="generation metrics (ROUGE, BERTScore, PubMedQA decision F1)",
                       description="Generate answers greedily and score them against references.")
    _common(g)
    g.add_argument("--set", "-s", default="pubmedqa",
                   help="comma-separated: pubmedqa, medquad, bitext, or JSONL file paths (query/response per line)")
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--no-bertscore", action="store_true", help="skip BERTScore (saves loading the encoder)")
    g.set_defaults(module_run=run_generate, limit=20)
    c = sub.add_parser("compare", help="compare two results.json files on their common items")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    c.set_defaults(module_run=run_compare)


def _data_dir(args: argparse.Namespace) -> Path | None:
    if args.data_dir is not None:
        return args.data_dir
    from care.paths import shared_data_dir

    return shared_data_dir()


@contextlib.contextmanager
def _progress():
    """A rich progress bar per (model, set) with ETA on a terminal; off one (a log), periodic one-line progress."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    if not console.is_terminal:
        from care.progress import LineProgress

        def lines(desc: str, total: int):
            line = LineProgress(desc, total)
            return lambda n: line.advance(n)

        yield lines
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("ETA"), TimeRemainingColumn(), console=console) as bar:
        def factory(desc: str, total: int):
            task = bar.add_task(desc, total=total)
            return lambda n: bar.advance(task, n)

        yield factory


def _check(args: argparse.Namespace) -> None:
    from care.errors import UsageError

    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be at least 1, got {args.limit}")


def run_mc(args: argparse.Namespace) -> int:
    _check(args)
    from care.eval.runner import run_mc as run

    with _progress() as factory:
        results, paths = run(args.model, args.bench, args.out, data_dir=_data_dir(args), shots=args.shots,
                             limit=args.limit, seed=args.seed, threads=args.threads, n_ctx=args.n_ctx,
                             medqa_file=args.medqa_file, progress=factory)
    for label, benches in results["results"].items():
        for bench, r in benches.items():
            lo, hi = r["ci95"]
            print(f"{label:<24} {bench:<14} {100 * r['accuracy']:5.1f}%  [{100 * lo:.1f}, {100 * hi:.1f}]  "
                  f"n={r['n']}  {r['items_per_s'] or 0:.2f} items/s")
    print(f"Report: {paths['report']}  (results: {paths['results']})")
    return 0


def run_generate(args: argparse.Namespace) -> int:
    _check(args)
    from care.eval.runner import run_generate as run

    sets = [s.strip() for s in args.set.split(",") if s.strip()]
    with _progress() as factory:
        results, paths = run(args.model, sets, args.out, data_dir=_data_dir(args), limit=args.limit, seed=args.seed,
                             max_tokens=args.max_tokens, threads=args.threads, n_ctx=args.n_ctx,
                             bertscore=not args.no_bertscore, progress=factory)
    for label, per_set in results["results"].items():
        for name, r in per_set.items():
            extra = f"  BERTScore-F1 {100 * r['bertscore']['f1']:.1f}" if "bertscore" in r else ""
            if "decision" in r:
                extra += f"  decision acc {100 * r['decision']['accuracy']:.1f} macro-F1 {100 * r['decision']['macro_f1']:.1f}"
            print(f"{label:<24} {name:<12} ROUGE-L {100 * r['rouge']['rougeL']:.1f}{extra}  n={r['n']}")
    print(f"Report: {paths['report']}  (results: {paths['results']})")
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from care.eval.report import compare, load_results

    a, b = load_results(args.a), load_results(args.b)
    diff = compare(a, b)
    print(f"A = {args.a}\nB = {args.b}")
    print(f"{'benchmark':<26} {'model A':<18} {'model B':<18} {'n':>5} {'A %':>6} {'B %':>6} {'Δ pts':>7}  note")
    for r in diff["rows"]:
        note = ""
        if "mcnemar_p" in r:
            note = f"A-only {r['a_only_correct']}, B-only {r['b_only_correct']}, McNemar p={r['mcnemar_p']:.3f}"
        print(f"{r['benchmark']:<26} {r['model_a'][:18]:<18} {r['model_b'][:18]:<18} {r['n']:>5} "
              f"{100 * r['a']:6.1f} {100 * r['b']:6.1f} {100 * r['delta']:+7.1f}  {note}")
    for w in diff["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    if not diff["rows"]:
        print("No benchmark in common.", file=sys.stderr)
        return 1
    return 0
