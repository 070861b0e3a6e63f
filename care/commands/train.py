"""`care train RECIPE.yaml`: QLoRA / LoRA fine-tuning from a recipe (see care/train/config.py for the schema)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML (e.g. recipes/smoke.yaml)")
    parser.add_argument("--smoke", action="store_true", help="apply the recipe's `smoke` overrides (tiny run)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe value, e.g. --set training.lr=1e-4 (repeatable)")
    parser.add_argument("--out", default=None, help="output folder (default: runs/<recipe name>)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    parser.add_argument("--no-quant", action="store_true", help="plain LoRA on the full-precision base")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after N optimizer steps")
    parser.add_argument("--strict", action="store_true", help="bad data rows are fatal instead of skipped")


def run(args: argparse.Namespace) -> int:
    from care.train.config import load_recipe
    from care.train.distributed import is_main_process, world_size
    from care.train.sft import train

    recipe = load_recipe(args.recipe, smoke=args.smoke, overrides=args.overrides)
    out = Path(args.out) if args.out else Path("runs") / recipe.name
    main = is_main_process()  # under accelerate launch every process runs this; one of them reports
    if main:
        n = world_size()
        print(f"Training {recipe.name} -> {out}" + (f" ({n} processes)" if n > 1 else ""), file=sys.stderr)
    result = train(recipe, out, resume=args.resume, strict=args.strict, no_quant=args.no_quant,
                   max_steps=args.max_steps)
    if not main:
        return 130 if result.interrupted else 0
    m = result.metrics
    if result.interrupted:
        print(f"Stopped at step {m.get('global_step')}; checkpoint saved in {out}. "
              f"Continue with: care train {args.recipe} --out {out} --resume", file=sys.stderr)
        return 130
    print(json.dumps({k: m.get(k) for k in ("global_step", "first_loss", "last_loss", "best_eval_loss",
                                            "tokens_per_s", "train_runtime_s")}))
    print(f"Adapter: {result.adapter_dir}\nMetrics: {out / 'metrics.jsonl'}  Plot: {out / 'loss.png'}\n"
          f"Merge it with: care merge {result.adapter_dir} --out {out / 'merged'}", file=sys.stderr)
    return 0
