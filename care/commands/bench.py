"""`care bench`: load time, TTFT, prefill/decode tok/s, peak RSS and file size of a GGUF (or ONNX folder) here."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", default=None, help="a .gguf file, an ONNX folder (care export onnx) or a known name "
                        "(default: embedded SmolLM2)")
    parser.add_argument("--profile", choices=["laptop", "phone"], default="laptop",
                        help="laptop: all physical cores, n_ctx 4096; phone: 2 threads, n_ctx 4096, K/V cache "
                             "q8_0/q4_0, GGUF read into memory (one copy of the repacked weights), 4 GB ceiling "
                             "(default: laptop)")
    parser.add_argument("--threads", type=int, default=None, help="override the profile's thread count")
    parser.add_argument("--n-ctx", type=int, nargs="+", default=None, help="context length(s), e.g. 2048 4096")
    parser.add_argument("--kv-type", default=None, metavar="TYPE[/TYPE]",
                        help="K/V cache type: f16, q8_0 or q4_0 for both, or K/V such as q8_0/q4_0")
    parser.add_argument("--repack", choices=["on", "off"], default=None,
                        help="llama.cpp's repacked weight copy (faster on some CPUs, costs RSS)")
    parser.add_argument("--ceiling-gb", type=float, default=None,
                        help="memory ceiling in GB (phone profile: 4): a run is stopped the moment its RSS passes "
                             "it, as a phone's low-memory killer would, and the command exits 1; 0 turns it off")
    parser.add_argument("--mmap", choices=["on", "off"], default=None,
                        help="map the GGUF (on) or read it into memory (off); off with repack on avoids "
                             "llama.cpp's duplicate weight copy")
    parser.add_argument("--no-chat-ttft", dest="chat_ttft", action="store_false",
                        help="skip the new-chat first-token timing (no cache / cold / cached prompt cache, follow-up)")
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
    from care.runtime.bench import BenchConfig, add_decode_bound, run_isolated
    from care.runtime.loader import is_onnx_folder
    from care.runtime.membw import read_bandwidth
    from care.runtime.profiles import kv_label, resolve
    from care.system import physical_cores

    # The llama.cpp settings (KV type, repack, mmap) do not apply to an ONNX folder; threads and n_ctx do.
    model = Path(args.model) if is_onnx_folder(args.model) else resolve_gguf(args.model)
    on_off = {"on": True, "off": False}
    prof = resolve(args.profile, kv_type=args.kv_type, repack=on_off.get(args.repack),
                   use_mmap=on_off.get(args.mmap))
    threads = args.threads or prof["threads"] or physical_cores()
    ceiling = args.ceiling_gb if args.ceiling_gb is not None else prof["ceiling_gb"]
    ceiling = ceiling or None  # --ceiling-gb 0: no ceiling
    type_k, type_v, flash = prof["type_k"], prof["type_v"], prof["flash_attn"]
    repack, mmap = prof["repack"], prof["use_mmap"]
    kv = kv_label(type_k, type_v)
    err = Console(stderr=True)
    results = []
    for n_ctx in args.n_ctx or [prof["n_ctx"]]:
        cfg = BenchConfig(model=str(model), n_ctx=n_ctx, threads=threads, type_k=type_k, type_v=type_v, flash_attn=flash,
                          repack=repack, use_mmap=mmap, prompt_tokens=args.prompt_tokens,
                          gen_tokens=args.gen_tokens, chat_ttft=args.chat_ttft)
        err.print(f"[dim]measuring {model.name}: {threads} threads, n_ctx {n_ctx}, KV {kv}, "
                  f"repack {'default' if repack is None else repack}, mmap {mmap}"
                  f"{f', ceiling {ceiling:g} GB' if ceiling else ''} ...[/dim]")
        # Bandwidth right before the model run, with as many readers as decode threads: same load, same run.
        bandwidth = read_bandwidth(threads)
        results.append(add_decode_bound(run_isolated(cfg, ceiling_gb=ceiling), bandwidth))

    table = Table(title=f"care bench: {model.name} ({args.profile} profile)")
    for col in ("n_ctx", "threads", "KV", "repack", "mmap", "load s", "TTFT s", "prefill tok/s", "decode tok/s",
                "peak RSS GB", "file GB"):
        table.add_column(col, justify="right")
    for r in results:
        if "error" in r:
            over = f"[red]> {ceiling:g}[/red]" if r.get("over_ceiling") else ""
            table.add_row(str(r["n_ctx"]), str(r["threads"]), "-", "-", "-", "error: " + r["error"][:60],
                          *[""] * 3, over, "")
            continue
        rss = f"{r['peak_rss_gb']:.2f}"
        if r.get("over_ceiling"):
            rss = f"[red]{rss} > {ceiling:g}[/red]"
        table.add_row(str(r["n_ctx"]), str(r["threads"]), kv_label(r["type_k"], r["type_v"]), str(r["repack"]),
                      "on" if r.get("use_mmap", True) else "off",
                      f"{r['load_s']:.2f}",
                      f"{r['ttft_s']:.2f}", f"{r['prefill_tok_s']:.1f}", f"{r['decode_tok_s']:.1f}", rss,
                      f"{r['file_gb']:.2f}")
    console = Console(width=None if sys.stdout.isatty() else 140)
    console.print(table)
    ok = [r for r in results if "error" not in r]
    if any("chat_ttft_cached_s" in r or "decode_fraction" in r for r in ok):
        chats = Table(title="New chat (domain system prompt + a ~30-token question) and decode against the "
                            "memory-bandwidth bound")
        for col in ("n_ctx", "prefix tok", "question tok", "TTFT no cache s", "TTFT cold s", "TTFT cached s",
                    "follow-up s (new tok)", "read GB/s", "GB/token", "bound tok/s", "decode / bound"):
            chats.add_column(col, justify="right")
        for r in ok:
            def f(key: str, fmt: str = ".2f", r: dict = r) -> str:
                return format(r[key], fmt) if key in r else "-"
            follow = f"{f('followup_ttft_s')} ({r['followup_prefill']})" if "followup_prefill" in r else "-"
            chats.add_row(str(r["n_ctx"]), f("chat_prefix_tokens", "d"), f("chat_question_tokens", "d"),
                          f("chat_ttft_nocache_s"), f("chat_ttft_cold_s"), f("chat_ttft_cached_s"), follow,
                          f("bandwidth_gb_s", ".1f"), f("bytes_per_token_gb", ".3f"), f("bound_tok_s", ".1f"),
                          f("decode_fraction"))
        console.print(chats)
    out = Path(args.json_out or f"bench-{model.stem}-{args.profile}.json")
    write_json(out, {"profile": args.profile, "config": {"threads": threads, "kv_type": kv,
                     "flash_attn": flash, "repack": repack, "use_mmap": mmap, "ceiling_gb": ceiling,
                     "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens}, "results": results})
    print(f"Saved {out}", file=sys.stderr)
    if any("error" in r and not r.get("over_ceiling") for r in results):
        return 1
    over = [r for r in results if r.get("over_ceiling")]
    if over:
        print(f"Over the {ceiling:g} GB memory ceiling at n_ctx {', '.join(str(r['n_ctx']) for r in over)}: "
              "try --kv-type q4_0, a smaller --n-ctx or a smaller quantization", file=sys.stderr)
        return 1
    return 0

