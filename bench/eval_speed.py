"""Items per second for multiple-choice scoring of SmolLM2-135M: transformers (the embedded GGUF dequantized to
float32 via `gguf_file=`) vs llama.cpp (the same GGUF, Q4_1), on the same MMLU-medical/PubMedQA items.

    .venv/bin/python bench/eval_speed.py [--threads 2] [--items 30] [--bench mmlu_medical]

Prints measured figures and the GGUF/HF ratio; also checks that both pick the same answers.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--items", type=int, default=30)
    ap.add_argument("--bench", default="mmlu_medical")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from care.eval.backends import GGUFBackend, HFBackend
    from care.eval.benchmarks import load_benchmark
    from care.eval.scoring import score_benchmark
    from care.models import embedded_gguf
    from care.paths import shared_data_dir

    items = load_benchmark(args.bench, shared_data_dir(), limit=args.items, seed=args.seed)
    gguf = embedded_gguf()
    rows = {}
    for name, make in (("hf", lambda: HFBackend(gguf.parent, "hf", gguf_file=gguf.name, threads=args.threads)),
                       ("gguf", lambda: GGUFBackend(gguf, "gguf", n_ctx=4096, threads=args.threads))):
        t0 = time.perf_counter()
        backend = make()
        load_s = time.perf_counter() - t0
        score_benchmark(backend, items[:2])  # warm-up (allocations, first-call overheads)
        res = score_benchmark(backend, items)
        backend.close()
        rows[name] = (load_s, res)
        print(f"{name:<5} load {load_s:6.2f} s   {res['items_per_s']:6.2f} items/s   "
              f"accuracy {100 * res['accuracy']:.1f}% on {res['n']} {args.bench} items, {args.threads} threads")
    hf, gg = rows["hf"][1], rows["gguf"][1]
    same = sum(a["pred"] == b["pred"] for a, b in zip(hf["items"], gg["items"], strict=True))
    diff = max(abs(x - y) for a, b in zip(hf["items"], gg["items"], strict=True)
               for x, y in zip(a["loglik"], b["loglik"], strict=True))
    print(f"ratio gguf/hf items/s: {gg['items_per_s'] / hf['items_per_s']:.2f}x")
    print(f"same prediction on {same}/{len(items)} items; max |loglik diff| {diff:.3f} "
          "(HF runs the dequantized weights in float32, llama.cpp the Q4_1 weights with 8-bit activations)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
