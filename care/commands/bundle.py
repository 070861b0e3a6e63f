"""`care bundle`: an offline install folder + .tar.gz (wheelhouse, model, install.sh, start.sh, checksums)."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", default=None,
                        help="the .gguf to ship (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--adapters", nargs="+", default=[], metavar="GGUF",
                        help="GGUF LoRA adapters to ship; the first one is applied by start.sh")
    parser.add_argument("--safety", default=None, metavar="YAML",
                        help="the clinic's safety rules (installed as the clinic's safety.yaml)")
    parser.add_argument("--out", "-o", required=True, help="bundle folder to write (DIR and DIR.tar.gz)")
    parser.add_argument("--platform", default=None, choices=["linux-x86_64", "linux-aarch64"],
                        help="linux-x86_64 (this machine's OS and Python; default) or linux-aarch64 (the same CARE "
                        "runtime for an ARM board or Linux phone; Termux: care/data/bundle/termux-build.sh)")
    parser.add_argument("--python", default=None, metavar="X.Y",
                        help="linux-aarch64: the target's Python version (default: this machine's, e.g. 3.11 for "
                        "Debian 12 / Raspberry Pi OS)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    import logging

    from care.models import embedded_gguf
    from care.toolchain.bundle import build_bundle

    logging.getLogger("care.toolchain").setLevel(logging.INFO)  # builds can take minutes: say what happens
    bundle = build_bundle(args.model or embedded_gguf(), args.out, adapters=args.adapters, safety=args.safety,
                          target=args.platform, python=args.python)
    result = {"folder": str(bundle.folder), "archive": str(bundle.archive), "platform": bundle.platform,
              "folder_mib": round(bundle.folder_bytes / 2**20, 1),
              "archive_mib": round(bundle.archive_bytes / 2**20, 1), "files": len(bundle.files)}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"Bundle for {bundle.platform}: {bundle.folder} ({result['folder_mib']} MiB, {result['files']} files)")
    print(f"Archive: {bundle.archive} ({result['archive_mib']} MiB)")
    print("On the target machine: tar xzf the archive, then run ./install.sh inside the folder.")
    return 0
