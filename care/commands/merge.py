"""`care merge ADAPTER_DIR --out DIR`: merge a LoRA adapter into its base (never into 4-bit weights), verified."""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", help="the adapter/ folder written by `care train`")
    parser.add_argument("--out", required=True, help="folder for the merged model")
    parser.add_argument("--method", choices=("reload", "dequantize", "both"), default="reload",
                        help="reload: base in full precision + adapter (usual); dequantize: the NF4 base "
                             "trained against, dequantized + adapter; both: build both, keep the closer one")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="max |logit diff| merged vs adapter model (default 1e-3 in fp32, 5e-2 in bf16)")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                        help="merge and save in this dtype (auto: the base's own 16-bit dtype, else float32)")
    parser.add_argument("--no-verify", action="store_true", help="skip the logit check (not recommended)")


def run(args: argparse.Namespace) -> int:
    from care.train.distributed import refuse_in_launch
    from care.train.merge import merge_adapter

    refuse_in_launch("merge")

    report = merge_adapter(args.adapter, args.out, method=args.method, verify=not args.no_verify,
                           tolerance=args.tolerance, dtype=args.dtype)
    for c in report.candidates:
        trained = c.get("trained_max_abs_diff")
        extra = f", vs trained NF4 model {trained:.3g} (top-1 {c['trained_top1_agreement']:.3f})" if trained \
            is not None else ""
        print(f"{c['method']:<10} max|Δlogit| vs adapter model {c['max_abs_diff']:.3g}, "
              f"top-1 agreement {c['top1_agreement']:.3f}{extra}", file=sys.stderr)
    print(json.dumps(report.to_dict() | {"candidates": len(report.candidates)}, default=str))
    print(f"Merged ({report.method}) model saved to {report.out_dir}", file=sys.stderr)
    return 0
