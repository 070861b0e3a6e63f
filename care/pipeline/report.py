"""The pipeline's report (demo_report.json / .md, rewritten after every stage) and its progress hooks."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from care.io import write_json, write_text

log = logging.getLogger(__name__)

STAGES = ("train", "merge", "export", "before_after", "eval")


@dataclass
class StageRecord:
    name: str
    status: str = "pending"  # pending | running | done | skipped | failed | interrupted
    seconds: float = 0.0
    summary: str = ""
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class PipelineReport:
    recipe_name: str
    out_dir: Path
    recipe_path: str | None
    smoke: bool
    stages: list[StageRecord]
    started_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    total_seconds: float = 0.0
    status: str = "running"  # running | done | failed | interrupted
    base_gguf: str | None = None
    tuned_gguf: str | None = None
    before_after: list[dict[str, Any]] = field(default_factory=list)
    chat_command: str | None = None
    error: str | None = None
    machine: dict[str, Any] = field(default_factory=dict)

    def stage(self, name: str) -> StageRecord:
        return next(s for s in self.stages if s.name == name)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out_dir"] = str(self.out_dir)
        return jsonable(d)


def jsonable(obj: Any) -> Any:
    """Plain JSON types for reports of other modules' result objects (dataclasses, Paths, numpy numbers)."""
    if hasattr(obj, "to_dict") and callable(obj.to_dict):
        obj = obj.to_dict()
    elif hasattr(obj, "__dataclass_fields__"):
        obj = asdict(obj)
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if hasattr(obj, "item"):
        try:
            return obj.item()
        except (TypeError, ValueError):
            pass
    return str(obj)


def _fmt_s(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{seconds:.1f}s"


def render_markdown(rep: PipelineReport) -> str:
    lines = [f"# {rep.recipe_name}: pipeline report", "",
             f"- status: **{rep.status}**, total {_fmt_s(rep.total_seconds)}",
             f"- recipe: `{rep.recipe_path or 'built-in demo recipe'}`{' (smoke)' if rep.smoke else ''}",
             f"- output: `{rep.out_dir}`", f"- machine: {rep.machine.get('summary', '')}", ""]
    if rep.error:
        lines += [f"**Error:** {rep.error}", ""]
    lines += ["| stage | status | time | summary |", "|---|---|---|---|"]
    for s in rep.stages:
        summary = s.summary.replace("|", "\\|")  # a pipe would end the Markdown cell
        lines.append(f"| {s.name} | {s.status} | {_fmt_s(s.seconds) if s.seconds else ''} | {summary} |")
    if rep.before_after:
        lines += ["", "## Before / after (greedy, same questions)", "",
                  f"before: `{rep.base_gguf}`  ", f"after: `{rep.tuned_gguf}`", ""]
        for qa in rep.before_after:
            lines += [f"### [{qa['domain']}] {qa['question']}", "", "**Before:**", "",
                      _quote(qa.get("before", "")), "", "**After:**", "", _quote(qa.get("after", "")), ""]
    if rep.chat_command:
        lines += ["## Chat with the new model", "", "```bash", rep.chat_command, "```", ""]
    return "\n".join(lines)


def _quote(text: str) -> str:
    return "\n".join("> " + line for line in (text.strip() or "(empty)").splitlines())


def save_report(rep: PipelineReport) -> None:
    write_json(rep.out_dir / "demo_report.json", rep.to_dict())
    write_text(rep.out_dir / "demo_report.md", render_markdown(rep))


class Reporter:
    """Progress hooks; the CLI subclasses it with rich output. The default logs."""

    def stage_start(self, index: int, total: int, name: str, description: str) -> None:
        log.info("[%d/%d] %s: %s", index, total, name, description)

    def stage_end(self, record: StageRecord) -> None:
        log.info("%s %s in %s: %s", record.name, record.status, _fmt_s(record.seconds), record.summary)

    def note(self, text: str) -> None:
        log.info("%s", text)

    def answer(self, domain: str, question: str, before: str, after: str) -> None:
        log.info("[%s] %s\nbefore: %s\nafter: %s", domain, question, before, after)

    def eval_progress(self, desc: str, total: int) -> Callable[[int], None]:
        return lambda _n: None

    def step(self, what: str, done: int, total: int) -> None:
        """Sub-step progress inside a stage (e.g. 'convert f16', 120, 272)."""
