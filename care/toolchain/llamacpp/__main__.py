"""`python -m care.toolchain.llamacpp wheel|tools NAME...|sdist`: what `make setup` calls before care is installed."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from care.errors import CareError
from care.toolchain.llamacpp.source import fetch_sdist
from care.toolchain.llamacpp.tools import TARGETS, build_tools, find_tools
from care.toolchain.llamacpp.wheel import WHEEL_TARGETS, build_wheel, find_wheel


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m care.toolchain.llamacpp",
                                     description="Build llama.cpp (the llama-cpp-python wheels, its tools) or fetch its source")
    parser.add_argument("what", choices=["wheel", "tools", "sdist"])
    parser.add_argument("names", nargs="*", help="tools: llama.cpp tool names")
    parser.add_argument("--version", default=None, help="llama-cpp-python version (default: the installed one)")
    parser.add_argument("--target", default="native", choices=sorted({*TARGETS, *WHEEL_TARGETS}),
                        help="native (portable x86), linux-aarch64 (cross-built), device (wheel only: this CPU, e.g. Termux)")
    parser.add_argument("--cached-only", action="store_true", help="print the cached path, never build")
    parser.add_argument("--force", action="store_true")
    opts = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        if opts.what == "sdist":
            paths = [fetch_sdist(opts.version)]
        elif opts.what == "wheel":
            found = (find_wheel(opts.version, opts.target) if opts.cached_only
                     else build_wheel(opts.version, target=opts.target, force=opts.force))
            if found is None:
                return 1
            paths = [found]
        else:
            tools = (find_tools(opts.names, opts.target, opts.version) if opts.cached_only
                     else build_tools(opts.names, opts.target, opts.version, force=opts.force))
            if tools is None:
                return 1
            paths = list(tools.values())
    except CareError as exc:
        sys.stderr.write(f"Error: {exc.one_line()}\n")
        return 2
    sys.stdout.write("".join(f"{p}\n" for p in paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
