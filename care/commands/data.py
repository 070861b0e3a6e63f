"""`care data RECIPE.yaml`: load, clean, balance and mix a recipe's data; print and save the data report."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML whose `data` section to build")
    parser.add_argument("--smoke", action="store_true", help="apply the recipe's `smoke` overrides")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe value, e.g. --set data.val_fraction=0.1 (repeatable)")
    parser.add_argument("--out", default=None, help="folder for data_report.json and train/val JSONL files")
    parser.add_argument("--strict", action="store_true", help="bad rows are fatal instead of skipped")
    parser.add_argument("--no-tokenizer", action="store_true",
                        help="skip token lengths and the max-length check (no model needed)")


def _write_jsonl(path: Path, records) -> None:
    from dataclasses import asdict

    from care.io import atomic_path
    from care.train.formatting import to_messages

    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as fh:
        for r in records:
            row = {k: v for k, v in asdict(r).items() if k != "messages"} | {"messages": to_messages(r)}
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def run(args: argparse.Namespace) -> int:
    from care.io import write_json, write_text
    from care.train.config import load_recipe
    from care.train.sft import prepare_data

    recipe = load_recipe(args.recipe, smoke=args.smoke, overrides=args.overrides)
    tokenizer = None
    if not args.no_tokenizer:
        from care.train.modeling import load_tokenizer, resolve_base

        tokenizer = load_tokenizer(resolve_base(recipe.model, recipe.resolve_path))
    bundle = prepare_data(recipe, tokenizer, strict=args.strict)
    rep = bundle.report
    for i, st in enumerate(rep["stages"], 1):
        print(f"stage {i}:")
        for key in ("loaded", "after_dedupe", "after_balance", "after_caps_weights", "train", "val"):
            if key in st:
                print(f"  {key:<18} " + ", ".join(f"{d} {n}" for d, n in st[key].items()))
        tok = st.get("train_tokens")
        if tok:
            print(f"  train tokens       p50 {tok['p50']:.0f}, p90 {tok['p90']:.0f}, p99 {tok['p99']:.0f}, "
                  f"max {tok['max']:.0f}")
    bad = rep["bad_rows"]
    if bad["total"]:
        print(f"bad rows: {bad['total']}")
        for file, entry in bad["by_file"].items():
            reasons = ", ".join(f"{n} {r}" for r, n in entry["reasons"].items())
            print(f"  {file}: {entry['count']} ({reasons})")
            for e in entry["examples"]:
                print(f"    {file}:{e['line']}: {e['reason']}")
    if args.out:
        out = Path(args.out)
        write_json(out / "data_report.json", rep)
        write_text(out / "resolved_config.yaml", recipe.to_yaml())
        for i, st in enumerate(bundle.stages, 1):
            suffix = f"_stage{i}" if len(bundle.stages) > 1 else ""
            _write_jsonl(out / f"train{suffix}.jsonl", st.train)
            _write_jsonl(out / f"val{suffix}.jsonl", st.val)
        print(f"Report and splits written to {out}", file=sys.stderr)
    return 0
