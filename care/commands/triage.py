"""`care triage`: the emergency triage layer on messages, one JSON line each; no language model is loaded.

Clinic staff use it to test their <config dir>/safety.yaml (or `--rules FILE`) before a chat goes live.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from care.errors import DataError, UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("messages", nargs="*",
                        help="messages to triage; `-` reads stdin, one message a line")
    parser.add_argument("--file", type=Path, help="a UTF-8 text file, one message a line")
    parser.add_argument("--rules", type=Path,
                        help="a clinic rules file to use instead of <config dir>/safety.yaml")
    parser.add_argument("--context", action="store_true",
                        help="treat the messages as one conversation: earlier lines count as context")
    parser.add_argument("--lexicon-only", action="store_true", help="rules only, without the classifier")
    parser.add_argument("--lang", default=None,
                        help="languages the clinic serves, e.g. sw,en (default: the rules file's `languages`)")
    parser.add_argument("--show", action="store_true",
                        help="also print the notice and the first-aid card a flagged message gets")


def _read_lines(path: Path) -> list[str]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"Cannot read messages file: {exc.strerror}", path=path,
                        hint="Check the path; one message a line") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"Messages file is not UTF-8 text (byte {exc.start})", path=path,
                        hint="Save it as UTF-8, one message a line") from exc
    return [line for line in text.splitlines() if line.strip()]


def run(args: argparse.Namespace) -> int:
    from care.runtime import triage

    messages: list[str] = []
    for m in args.messages:
        if m == "-":
            try:
                messages.extend(line for line in sys.stdin.read().splitlines() if line.strip())
            except UnicodeDecodeError as exc:
                raise DataError("Standard input is not UTF-8 text", hint="Pipe UTF-8 text, one message a line") from exc
        else:
            messages.append(m)
    if args.file is not None:
        messages.extend(_read_lines(args.file))
    if not messages:
        raise UsageError("No messages to triage", hint="Pass messages, --file FILE, or - to read stdin")
    if args.rules is not None and not args.rules.is_file():
        raise DataError("Rules file not found", path=args.rules, hint="Pass an existing YAML file to --rules")
    rules = triage.load_rules(args.rules, classifier_on=not args.lexicon_only)
    served = tuple(x.strip() for x in args.lang.split(",") if x.strip()) if args.lang else None
    earlier: list[str] = []
    for text in messages:
        v = triage.assess([*(earlier if args.context else []), text], rules)
        row = {"text": text, "emergency": v.emergency, "category": v.category, "language": v.language,
               "script": v.script, "score": round(v.score, 4), "why": v.why}
        if args.show and v.emergency:
            card = triage.card(v, rules, served)
            row["notice"] = triage.notice_text(v, rules, served)
            row["card"] = card.text if card else None
        print(json.dumps(row, ensure_ascii=False))
        earlier.append(text)
    return 0
