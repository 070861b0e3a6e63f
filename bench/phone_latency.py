"""Phone-class responsiveness, measured: a new chat's first token without / with the persistent prompt cache,
a follow-up turn, and decode against the memory-bandwidth bound -- each configuration in its own child process
(care.runtime.bench), alternated round by round, medians printed.

    .venv/bin/python bench/phone_latency.py [--model FILE] [--rounds 3] [--sweep] [--out phone_latency.json]

--model defaults to the Phi-3.5-mini-shaped Q4_K_M that bench/phone_profile.py --phi35 builds in the care
cache (else the embedded SmolLM2). Per run: the memory read bandwidth with one reader process per decode
thread (care.runtime.membw), then the model child: 128-token prefill + 32-token decode (raw figures), then a
new chat (the medical domain's system prompt + a ~30-token question) without the cache, cold (evaluated and
saved) and cached (loaded from the file), and a follow-up question. --sweep adds the settings the phone profile
is chosen among (repack/mmap, threads). The machine's load average is printed: on a shared machine the
figures move with it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from care.models import embedded_gguf
from care.paths import cache_dir
from care.runtime.bench import BenchConfig, add_decode_bound, run_isolated
from care.runtime.membw import read_bandwidth
from care.runtime.profiles import PROFILES, kv_label

KEYS = ("ms_per_tok_nocache", "ms_per_tok_followup", "chat_ttft_nocache_s", "chat_ttft_cold_s", "chat_ttft_cached_s", "followup_ttft_s", "followup_prefill",
        "chat_prefix_tokens", "chat_question_tokens", "decode_tok_s", "prefill_tok_s", "bandwidth_gb_s",
        "bytes_per_token_gb", "bound_tok_s", "decode_fraction", "peak_rss_gb", "load_s")


def configs(sweep: bool, threads: int | None) -> dict[str, dict]:
    phone = PROFILES["phone"]
    base = {"threads": threads or phone["threads"], "n_ctx": phone["n_ctx"], "type_k": phone["type_k"],
            "type_v": phone["type_v"], "flash_attn": phone["flash_attn"], "repack": phone["repack"],
            "use_mmap": phone["use_mmap"]}
    out = {"phone profile": base}
    if sweep:
        out["repack off, mmap on"] = {**base, "repack": False, "use_mmap": True}
        if base["threads"] != 1:
            out["1 thread"] = {**base, "threads": 1}
    return out


def run_one(model: Path, cfg: dict) -> dict:
    bandwidth = read_bandwidth(cfg["threads"])
    # The Phi-3.5-shaped file carries the Phi-3 vocabulary GGUF's template, which drops system messages;
    # Phi-3.5-mini's own template keeps them (<|system|> ... <|end|>), as care.runtime.engine's "phi3" does.
    template = "phi3" if model.name.startswith("phi35-shaped") else None
    bc = BenchConfig(model=str(model), prompt_tokens=128, gen_tokens=32, chat_ttft=True, chat_template=template,
                     **cfg)
    r = add_decode_bound(run_isolated(bc), bandwidth)
    if "error" not in r:  # first-token time per prefilled token: a follow-up should cost what a new chat does
        r["ms_per_tok_nocache"] = 1e3 * r["chat_ttft_nocache_s"] / max(r["chat_prefill_nocache"], 1)
        r["ms_per_tok_followup"] = 1e3 * r["followup_ttft_s"] / max(r["followup_prefill"], 1)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="override the phone profile's 2 threads")
    ap.add_argument("--out", default="phone_latency.json")
    args = ap.parse_args()
    phi = cache_dir() / "bench" / "phi35-shaped.Q4_K_M.gguf"
    model = Path(args.model) if args.model else (phi if phi.is_file() else embedded_gguf())
    cfgs = configs(args.sweep, args.threads)
    load_start = os.getloadavg()
    print(f"{model.name} ({model.stat().st_size / 1e9:.2f} GB); load average at start {load_start[0]:.1f} "
          f"on {os.cpu_count()} CPUs", flush=True)
    runs: dict[str, list[dict]] = {name: [] for name in cfgs}
    for i in range(args.rounds):
        names = list(cfgs) if i % 2 == 0 else list(reversed(cfgs))  # alternate: load drift hits every config
        for name in names:
            t0 = time.perf_counter()
            r = run_one(model, cfgs[name])
            runs[name].append(r)
            if "error" in r:
                print(f"  round {i + 1} {name}: ERROR {r['error']}", flush=True)
                continue
            print(f"  round {i + 1} {name}: TTFT no cache {r['chat_ttft_nocache_s']:.2f} s, cold "
                  f"{r['chat_ttft_cold_s']:.2f} s, cached {r['chat_ttft_cached_s']:.2f} s, follow-up "
                  f"{r['followup_ttft_s']:.2f} s ({r['followup_prefill']} new tok) | decode {r['decode_tok_s']:.2f} "
                  f"tok/s, bound {r['bound_tok_s']:.1f} ({r['bandwidth_gb_s']:.1f} GB/s / "
                  f"{r['bytes_per_token_gb']:.3f} GB) -> {r['decode_fraction']:.2f} | RSS {r['peak_rss_gb']:.2f} GB "
                  f"[{time.perf_counter() - t0:.0f} s, load {os.getloadavg()[0]:.1f}]", flush=True)
    medians: dict[str, dict] = {}
    for name, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if ok:
            medians[name] = {k: statistics.median(r[k] for r in ok) for k in KEYS if all(k in r for r in ok)}
    load_end = os.getloadavg()
    phone = PROFILES["phone"]
    print(f"\nMedians of {args.rounds} alternated rounds ({model.name}, n_ctx {phone['n_ctx']}, KV "
          f"{kv_label(phone['type_k'], phone['type_v'])}); load average {load_start[0]:.1f} -> {load_end[0]:.1f} "
          f"on {os.cpu_count()} CPUs")
    print("| config | prefix tok | question tok | TTFT no cache s | TTFT cold s | TTFT cached s | follow-up s (new tok) "
          "| ms/tok new chat, follow-up | decode tok/s | read GB/s | GB/token | bound tok/s | decode/bound | peak RSS GB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, m in medians.items():
        print(f"| {name} | {m['chat_prefix_tokens']:.0f} | {m['chat_question_tokens']:.0f} | "
              f"{m['chat_ttft_nocache_s']:.2f} | {m['chat_ttft_cold_s']:.2f} | {m['chat_ttft_cached_s']:.2f} | "
              f"{m['followup_ttft_s']:.2f} ({m['followup_prefill']:.0f}) | {m['ms_per_tok_nocache']:.0f}, "
              f"{m['ms_per_tok_followup']:.0f} | {m['decode_tok_s']:.2f} | "
              f"{m['bandwidth_gb_s']:.1f} | {m['bytes_per_token_gb']:.3f} | {m['bound_tok_s']:.1f} | "
              f"{m['decode_fraction']:.2f} | {m['peak_rss_gb']:.2f} |")
    Path(args.out).write_text(json.dumps({"model": str(model), "load_start": load_start, "load_end": load_end,
                                          "medians": medians, "runs": runs}, indent=2) + "\n", encoding="utf-8")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
