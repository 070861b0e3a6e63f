"""`care models`: the known models and where their files are."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    from care.models import DEFAULT_MODEL, list_models

    rows = list_models()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Known models (any local .gguf path works too)")
    for col in ("name", "description", "license", "where"):
        table.add_column(col, overflow="fold")
    for row in rows:
        name = row["name"] + (" (default)" if row["name"] == DEFAULT_MODEL else "")
        table.add_row(name, row["description"], row["license"], row["where"])
    Console().print(table)
    return 0
