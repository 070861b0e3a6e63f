"""`care bench`: load time, TTFT, prefill/decode tok/s, peak RSS and file size of a GGUF on this device."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", default=None, help="a .gguf file or known name (default: embedded SmolLM2)")
    parser.add_argument("--profile", choices=["laptop", "phone"], default="laptop",
                        help="laptop: all physical cores, n_ctx 4096; phone: 2 threads, n_ctx 4096, q8_0 KV cache, "
                             "no repacked weight copy, 4 GB ceiling (default: laptop)")
    parser.add_argument("--threads", type=int, default=None, help="override the profile's thread count")
    parser.add_argument("--n-ctx", type=int, nargs="+", default=None, help="context length(s), e.g. 2048 4096")
    parser.add_argument("--kv-type", default=None, choices=["f16", "q8_0", "q4_0"], help="K and V cache type")
    parser.add_argument("--repack", choices=["on", "off"], default=None,
                        help="llama.cpp's repacked weight copy (faster on some CPUs, costs RSS)")
    parser.add_argument("--ceiling-gb", type=float, default=None,
                        help="memory ceiling in GB: a run whose peak RSS exceeds it is reported as over and "
                             "the command exits 1")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--json", dest="json_out", default=None, metavar="PATH",
                        help="where to save the results (default: bench-<model>-<profile>.json here)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    from care.io import write_json
    from care.models import resolve_gguf
    from care.runtime.bench import PROFILES, BenchConfig, physical_cores, run_isolated

    model = resolve_gguf(args.model)
    prof = dict(PROFILES[args.profile])
    threads = args.threads or prof["threads"] or physical_cores()
    ceiling = args.ceiling_gb if args.ceiling_gb is not None else prof["ceiling_gb"]
    kv = args.kv_type or prof["type_k"]
    kv = None if kv == "f16" else kv
    flash = True if kv else prof["flash_attn"]  # a quantized V cache needs flash attention in llama.cpp
    repack = {"on": True, "off": False}.get(args.repack, prof["repack"])
    err = Console(stderr=True)
    results = []
    for n_ctx in args.n_ctx or [prof["n_ctx"]]:
        cfg = BenchConfig(model=str(model), n_ctx=n_ctx, threads=threads, type_k=kv, type_v=kv, flash_attn=flash,
                          repack=repack, prompt_tokens=args.prompt_tokens, gen_tokens=args.gen_tokens)
        err.print(f"[dim]measuring {model.name}: {threads} threads, n_ctx {n_ctx}, KV {kv or 'f16'}, "
                  f"repack {'default' if repack is None else repack} ...[/dim]")
        res = run_isolated(cfg)
        if ceiling is not None and "peak_rss_gb" in res:
            res["ceiling_gb"] = ceiling
            res["within_ceiling"] = res["peak_rss_gb"] <= ceiling
        results.append(res)

    table = Table(title=f"care bench: {model.name} ({args.profile} profile)")
    for col in ("n_ctx", "threads", "KV", "repack", "load s", "TTFT s", "prefill tok/s", "decode tok/s",
                "peak RSS GB", "file GB"):
        table.add_column(col, justify="right")
    for r in results:
        if "error" in r:
            table.add_row(str(r["n_ctx"]), str(r["threads"]), "-", "-", "error: " + r["error"][:60], *[""] * 5)
            continue
        rss = f"{r['peak_rss_gb']:.2f}"
        if r.get("within_ceiling") is False:
            rss = f"[red]{rss} > {ceiling:g}[/red]"
        table.add_row(str(r["n_ctx"]), str(r["threads"]), r["type_k"], str(r["repack"]), f"{r['load_s']:.2f}",
                      f"{r['ttft_s']:.2f}", f"{r['prefill_tok_s']:.1f}", f"{r['decode_tok_s']:.1f}", rss,
                      f"{r['file_gb']:.2f}")
    Console(width=None if sys.stdout.isatty() else 140).print(table)
    out = Path(args.json_out or f"bench-{model.stem}-{args.profile}.json")
    write_json(out, {"profile": args.profile, "config": {"threads": threads, "kv_type": kv or "f16",
                     "flash_attn": flash, "repack": repack, "ceiling_gb": ceiling,
                     "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens}, "results": results})
    print(f"Saved {out}", file=sys.stderr)
    if any("error" in r for r in results):
        return 1
    return 1 if any(r.get("within_ceiling") is False for r in results) else 0
