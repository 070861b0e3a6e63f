"""The `care` command: a lazy dispatcher over one small module per subcommand (care/commands/<name>.py).

Only the chosen subcommand's module is imported, and those modules import torch/transformers inside
`run()`, so `care --help` and `care chat` start without them. Typed CareErrors become one line on
stderr and exit code 2; CARE_DEBUG=1 shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from care import __version__
from care.errors import CareError, UsageError

# name -> one-line help. The module is care.commands.<name with - as _>.
COMMANDS: dict[str, str] = {
    "data": "Load, clean, balance and mix training data; write a data report",
    "train": "QLoRA / LoRA supervised fine-tuning from a recipe",
    "merge": "Merge a LoRA adapter into its base model and verify the result",
    "export": "Export a merged model to GGUF (llama.cpp) or ONNX, verified against the source",
    "chat": "Chat offline with a GGUF model (terminal app, or --once for scripts)",
    "serve": "OpenAI-compatible chat server on the clinic LAN",
    "eval": "Medical benchmarks and generation metrics, reports with charts",
    "bench": "Measure load time, TTFT, tokens/s and peak RSS of a GGUF on this device",
    "bundle": "Offline install bundle (wheels, model, install.sh) for a clinic PC or an ARM device",
    "demo": "The whole pipeline on the embedded SmolLM2: train, merge, export, before/after",
    "models": "List known models and where their files are",
}


def _top_parser() -> argparse.ArgumentParser:
    lines = [f"  {name:<8} {text}" for name, text in COMMANDS.items()]
    parser = argparse.ArgumentParser(
        prog="care",
        description="CARE Edge: from QLoRA fine-tuning to an offline chat on a laptop or phone-class device.",
        epilog="commands:\n" + "\n".join(lines) + "\n\nRun `care COMMAND --help` for a command's options. "
        "Set CARE_DEBUG=1 to see tracebacks.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"care {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.add_argument("command", nargs="?", help=argparse.SUPPRESS)
    return parser


def load_command(name: str):
    """Import and return the module implementing subcommand `name`."""
    if name not in COMMANDS:
        close = [c for c in COMMANDS if c.startswith(name[:2])] if name else []
        hint = f"Did you mean: {', '.join(close)}? " if close else ""
        raise UsageError(f"Unknown command '{name}'", hint=hint + "Run `care --help` to list the commands")
    return importlib.import_module(f"care.commands.{name.replace('-', '_')}")


def build_parser(name: str) -> argparse.ArgumentParser:
    module = load_command(name)
    parser = argparse.ArgumentParser(prog=f"care {name}", description=COMMANDS[name])
    module.add_arguments(parser)
    return parser


def _setup_logging(verbose: bool) -> None:
    level = logging.DEBUG if os.environ.get("CARE_DEBUG") else (logging.INFO if verbose else logging.WARNING)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    # Split global options from the subcommand and its own arguments.
    idx = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    head, rest = (argv, []) if idx is None else (argv[:idx], argv[idx + 1 :])
    opts = top.parse_args(head)
    _setup_logging(opts.verbose)
    if idx is None:
        top.print_help()
        return 0
    name = argv[idx]
    try:
        parser = build_parser(name)
        args = parser.parse_args(rest)
        args.verbose = opts.verbose
        return int(args.module_run(args) if hasattr(args, "module_run") else load_command(name).run(args) or 0)
    except CareError as exc:
        if os.environ.get("CARE_DEBUG"):
            raise
        print(f"Error: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        if os.environ.get("CARE_DEBUG"):
            raise
        print("Interrupted. Outputs written so far are kept.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
