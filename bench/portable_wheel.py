"""Decode speed: the portable llama-cpp-python wheel (runtime CPU dispatch) vs the venv's installed build.

Goal: the portable wheel decodes on par with a native (-march=native) build on this machine, because ggml
picks its best CPU module (AVX-512 here) at run time. Each side runs in its own process (one libllama per
process), interleaved (installed, portable, installed, ...) so load changes on a shared machine hit both;
medians are compared. Greedy, 1 thread by default, on the embedded SmolLM2 unless --model.

    .venv/bin/python bench/portable_wheel.py [--wheel X.whl] [--model X.gguf] [--rounds 5] [--tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from care.runtime import llama_compat


def child(model: str, tokens: int, threads: int) -> None:
    import re

    llama_cpp = llama_compat.load()

    llm = llama_cpp.Llama(model_path=model, n_ctx=512, n_threads=threads, verbose=False)
    prompt = llm.tokenize(b"Explain how to keep vaccines cold in a rural clinic.", add_bos=True, special=True)
    stamps = []
    for _tok in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0):
        stamps.append(time.perf_counter())
        if len(stamps) > tokens:
            break
    with open("/proc/self/maps", encoding="utf-8") as fh:
        variant = sorted(set(re.findall(r"libggml-cpu-([\w.]+?)\.so", fh.read()))) or ["(single build)"]
    json.dump({"tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]), "variant": variant[0],
               "lib": str(Path(llama_cpp.__file__).parent)}, sys.stdout)


def run(pythonpath: str | None, model: str, tokens: int, threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": pythonpath or ""}
    out = subprocess.run([sys.executable, __file__, "--child", model, str(tokens), str(threads)], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wheel", default=None, help="portable wheel (default: the cached build)")
    parser.add_argument("--model", default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    from care.models import embedded_gguf
    from care.toolchain import llamacpp

    wheel = Path(args.wheel) if args.wheel else llamacpp.find_wheel()
    if wheel is None:
        print("No portable wheel cached: run `python -m care.toolchain.llamacpp wheel` first", file=sys.stderr)
        return 1
    model = args.model or str(embedded_gguf())
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(tmp)
        for lib in (Path(tmp) / "llama_cpp" / "lib").iterdir():
            lib.chmod(0o755)
        sides: dict[str, list[dict]] = {"installed": [], "portable": []}
        for _ in range(args.rounds):
            sides["installed"].append(run(None, model, args.tokens, args.threads))
            sides["portable"].append(run(tmp, model, args.tokens, args.threads))
    med = {k: statistics.median(r["tok_s"] for r in v) for k, v in sides.items()}
    for name, runs in sides.items():
        each = ", ".join(f"{r['tok_s']:.1f}" for r in runs)
        print(f"{name:9} {med[name]:7.1f} tok/s (median of {len(runs)}; runs {each}) "
              f"cpu module: {runs[0]['variant']}  {runs[0]['lib']}")
    print(f"portable / installed decode: x{med['portable'] / med['installed']:.3f} "
          f"({args.threads} thread(s), {args.tokens} tokens, {Path(model).name})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
