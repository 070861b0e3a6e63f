"""`care demo`: the whole pipeline on the embedded SmolLM2 (train, merge, export, before/after, chat command).

`care demo --recipe recipes/X.yaml [--smoke]` runs the same pipeline for a recipe, evaluation included.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", default=None,
                        help="run this recipe's pipeline instead of the built-in demo (e.g. recipes/care.yaml)")
    parser.add_argument("--smoke", action="store_true", help="with --recipe: apply its `smoke` overrides")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe value, e.g. --set training.max_steps=10 (repeatable)")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps of the built-in demo (default 20: ~3.5 min in all on 2 CPU cores)")
    parser.add_argument("--out", default=None, help="output folder (default: runs/demo-<timestamp>)")
    parser.add_argument("--eval-limit", type=int, default=None, help="items per benchmark (overrides the recipe)")
    parser.add_argument("--no-eval", action="store_true", help="skip the evaluation stage")
    parser.add_argument("--max-tokens", type=int, default=160, help="tokens per before/after answer")
    parser.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: idle cores)")


def _reporter(console):
    from rich.markup import escape
    from rich.panel import Panel
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from care.pipeline import Reporter
    from care.progress import LineProgress

    class RichReporter(Reporter):
        def stage_start(self, index, total, name, description):
            console.rule(f"[bold][{index}/{total}] {name}[/bold] · {escape(description)}")

        def stage_end(self, record):
            color = {"done": "green", "skipped": "yellow"}.get(record.status, "red")
            console.print(f"[{color}]{record.status}[/{color}] {record.name} in {record.seconds:.1f}s"
                          + (f": {escape(record.summary)}" if record.summary else ""))

        def note(self, text):
            console.print(escape(text))

        def answer(self, domain, question, before, after):
            console.print(Panel(f"[bold]Before:[/bold] {escape(before)}\n\n[bold]After:[/bold] {escape(after)}",
                                title=escape(f"[{domain}] {question}"), title_align="left"))

        def step(self, what, done, total):
            if not console.is_terminal:  # a log: periodic lines, no redrawn bar
                lines = self.__dict__.setdefault("_lines", {})
                lines.setdefault(what, LineProgress(what, total)).update(done)
                return
            bars = self.__dict__.setdefault("_bars", {})
            if what not in bars:
                progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                    TimeRemainingColumn(), console=console)
                bars[what] = (progress, progress.add_task(escape(what), total=total))
                progress.start()
            progress, task = bars[what]
            progress.update(task, completed=done, total=total)
            if done >= total:
                progress.stop()

        def eval_progress(self, desc, total):
            if not console.is_terminal:
                line = LineProgress(desc, total)
                return lambda n=1: line.advance(n)
            progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeRemainingColumn(), console=console, transient=False)
            task = progress.add_task(escape(desc), total=total)
            progress.start()
            done = {"n": 0}

            def tick(n: int = 1) -> None:
                done["n"] += n
                progress.update(task, advance=n)
                if done["n"] >= total:
                    progress.stop()

            return tick

    return RichReporter()


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.syntax import Syntax

    from care.errors import UsageError
    from care.pipeline import DEFAULT_STEPS, PipelineOptions, default_out_dir, demo_recipe, run_pipeline

    console = Console(stderr=True)
    if args.recipe:
        if args.steps is not None:
            raise UsageError("--steps is for the built-in demo", hint="Use --set training.max_steps=N with --recipe")
        from care.train.config import load_recipe

        recipe = load_recipe(args.recipe, smoke=args.smoke, overrides=args.overrides)
    else:
        if args.smoke:
            raise UsageError("--smoke needs --recipe", hint="The built-in demo is already small; use --steps N")
        recipe = demo_recipe(args.steps or DEFAULT_STEPS, overrides=args.overrides)
    out = Path(args.out) if args.out else default_out_dir("demo" if not args.recipe else recipe.name)
    console.print(f"[bold]CARE Edge pipeline[/bold]: {recipe.name} -> {out}")
    console.print(Syntax(recipe.to_yaml(), "yaml", theme="ansi_dark", line_numbers=False))
    opts = PipelineOptions(run_eval=not args.no_eval, eval_limit=args.eval_limit, max_tokens=args.max_tokens,
                           threads=args.threads)
    try:
        rep = run_pipeline(recipe, out, smoke=args.smoke, options=opts, reporter=_reporter(console))
    except KeyboardInterrupt:
        console.print(f"[yellow]Interrupted.[/yellow] Everything written so far is kept in {out} "
                      f"(see {out / 'demo_report.md'}).")
        return 130
    except Exception:
        console.print(f"[red]The pipeline stopped.[/red] Partial report: {out / 'demo_report.md'}")
        raise
    console.rule("[bold green]done")
    console.print(f"Total time: {rep.total_seconds / 60:.1f} min. Report: {out / 'demo_report.md'}")
    console.print("Chat with the new model:")
    print(rep.chat_command, file=sys.stdout)
    return 0
