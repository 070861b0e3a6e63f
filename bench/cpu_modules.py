"""Prefill and decode with each llama.cpp CPU module of the portable wheel, in one run, on this machine.

The question of issue 22: with the AMX tile fix (care/toolchain/patches.py), is the AMX module
(sapphirerapids) worth keeping over the AVX-512 one (zen4 / icelake) that the CPU guard would otherwise
fall back to? Each module runs in its own process, pinned to it by a folder of links that holds only that
CPU module (care/runtime/cpu_guard.py's mechanism), in alternated rounds so that load changes on a shared
machine hit both; medians are printed with their ratio.

    .venv/bin/python bench/cpu_modules.py [--model X.gguf | --phi35] [--modules sapphirerapids,zen4]
        [--rounds 3] [--prompt 256] [--gen 32] [--threads 2] [--check]

--check first compares the modules' greedy tokens (a 60-token prompt: a batch, so the AMX tiles run), each in
its own process, alone and after PyTorch has run a bf16 matmul on the same thread (oneDNN's AMX kernels load
their own tile config and release the tiles: the case care/toolchain/llamacpp/patches.py, 3, fixes). On a Xeon,
with CARE_CPU_ALLOW_AMX=1, that is the check that the AMX module can be trusted again.

--phi35 builds (once, ~2.5 GB in the care cache) the Phi-3.5-mini-shaped Q4_K_M with bench/phone_profile.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def only(lib: Path, module: str) -> Path:
    from care.runtime import cpu_guard

    others = [p.name for p in lib.glob("libggml-cpu-*.so") if cpu_guard.variant_name(p.name) != module]
    if len(others) == len(list(lib.glob("libggml-cpu-*.so"))):
        raise SystemExit(f"no libggml-cpu-{module}.so in {lib}")
    return cpu_guard.without(lib, others)


_GREEDY_CHILD = """
import json, os, sys
if os.environ.get("CARE_BENCH_TORCH_FIRST"):
    import torch  # oneDNN: AMX-BF16 on a CPU that has it
    a = torch.randn(512, 512, dtype=torch.bfloat16)
    (a @ a).float().sum().item()
from care.runtime import llama_compat
llm = llama_compat.load().Llama(model_path=sys.argv[1], n_ctx=256, n_threads=int(sys.argv[2]), verbose=False)
prompt = " ".join(["The capital of France is Paris, and the capital of Italy is Rome."] * 4) + " The capital of"
toks = []
for t in llm.generate(llm.tokenize(prompt.encode(), add_bos=True), temp=0.0, top_k=1, repeat_penalty=1.0):
    if t == llm.token_eos() or len(toks) == 16:
        break
    toks.append(t)
print("CARE_TOKENS " + json.dumps([toks, llm.detokenize(toks).decode("utf-8", "replace")]))
"""


def greedy(model: Path, folder: Path, threads: int, torch_first: bool) -> tuple[list[int], str] | str:
    """(tokens, text) of a greedy continuation with only `folder`'s CPU module, or why it failed."""
    from care.errors import ToolError
    from care.proc import run_tool
    from care.runtime import cpu_guard

    env = {**os.environ, cpu_guard.LIB_ENV: str(folder), cpu_guard.DONE_ENV: str(folder)}
    if torch_first:
        env["CARE_BENCH_TORCH_FIRST"] = "1"
    lines: list[str] = []
    try:
        run_tool([sys.executable, "-c", _GREEDY_CHILD, str(model), str(threads)], what="the greedy child", env=env,
                 on_line=lines.append, timeout=600)
    except ToolError as exc:
        return exc.one_line()
    found = [ln for ln in lines if ln.startswith("CARE_TOKENS ")]
    return tuple(json.loads(found[-1].split(" ", 1)[1])) if found else "no tokens printed"


def check(model: Path, folders: dict[str, Path], threads: int) -> bool:
    results = {}
    for m, folder in folders.items():
        for torch_first in (False, True):
            results[(m, torch_first)] = greedy(model, folder, threads, torch_first)
            got = results[(m, torch_first)]
            print(f"  {m:<15} {'after torch bf16' if torch_first else 'alone':<17} "
                  + (repr(got[1]) if isinstance(got, tuple) else f"FAILED: {got}"))
    ref = next(iter(results.values()))
    same = all(isinstance(r, tuple) and r[0] == ref[0] for r in results.values()) and isinstance(ref, tuple)
    print("greedy tokens: " + ("the same in every module and case" if same else "DIFFER (see above)"))
    return same


def phi35_q4() -> Path:
    from phone_profile import quantize, write_phi35_shaped_f16

    from care.paths import cache_dir

    work = cache_dir() / "bench"
    work.mkdir(parents=True, exist_ok=True)
    q4 = work / "phi35-shaped.Q4_K_M.gguf"
    if not q4.is_file():
        f16 = write_phi35_shaped_f16(work / "phi35-shaped.f16.gguf")
        quantize(f16, q4)
        f16.unlink()
    return q4


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="a GGUF (default: the embedded SmolLM2)")
    ap.add_argument("--phi35", action="store_true", help="the Phi-3.5-mini-shaped Q4_K_M (built once)")
    ap.add_argument("--modules", default="sapphirerapids,zen4")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    ap.add_argument("--check", action="store_true", help="first compare the modules' greedy tokens (see above)")
    opts = ap.parse_args()

    from care.models import embedded_gguf
    from care.runtime import cpu_guard
    from care.runtime.bench import BenchConfig, run_isolated

    model = phi35_q4() if opts.phi35 else (opts.model or embedded_gguf())
    lib = cpu_guard.lib_dir()
    if lib is None:
        raise SystemExit("llama-cpp-python is not installed")
    modules = [m for m in opts.modules.split(",") if m]
    folders = {m: only(lib, m) for m in modules}
    agreed = True
    if opts.check:
        print(f"greedy check, {model.name}, {opts.threads} threads:")
        agreed = check(model, folders, opts.threads)
    print(f"model {model.name} ({model.stat().st_size / 1e9:.2f} GB), {opts.threads} threads, prompt {opts.prompt}, "
          f"gen {opts.gen}, {opts.rounds} alternated rounds")
    runs: dict[str, list[dict]] = {m: [] for m in modules}
    for r in range(opts.rounds):
        for m in modules if r % 2 == 0 else reversed(modules):
            os.environ[cpu_guard.LIB_ENV] = str(folders[m])
            os.environ[cpu_guard.DONE_ENV] = str(folders[m])  # measure exactly this module (no guard probe)
            res = run_isolated(BenchConfig(model=str(model), n_ctx=max(1024, opts.prompt + opts.gen + 64),
                                           threads=opts.threads, prompt_tokens=opts.prompt, gen_tokens=opts.gen,
                                           chat_ttft=False))
            if "error" in res:
                print(f"  {m}: {res['error']}")
                continue
            runs[m].append(res)
            print(f"  round {r + 1} {m:<15} prefill {res['prefill_tok_s']:8.1f} tok/s   decode {res['decode_tok_s']:6.2f} tok/s")
    summary = {}
    for m, rs in runs.items():
        if rs:
            summary[m] = {"prefill_tok_s": statistics.median(x["prefill_tok_s"] for x in rs),
                          "decode_tok_s": statistics.median(x["decode_tok_s"] for x in rs), "runs": len(rs)}
    print("\nmedians:")
    for m, s in summary.items():
        print(f"  {m:<15} prefill {s['prefill_tok_s']:8.1f} tok/s   decode {s['decode_tok_s']:6.2f} tok/s")
    if len(summary) == 2:
        a, b = list(summary)
        print(f"ratio {a}/{b}: prefill {summary[a]['prefill_tok_s'] / summary[b]['prefill_tok_s']:.2f}x, "
              f"decode {summary[a]['decode_tok_s'] / summary[b]['decode_tok_s']:.2f}x")
    if opts.out:
        opts.out.write_text(json.dumps({"model": str(model), "modules": summary, "runs": runs}, indent=2) + "\n")
    return 0 if agreed else 1


if __name__ == "__main__":
    raise SystemExit(main())
