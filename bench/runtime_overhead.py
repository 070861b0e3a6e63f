"""Our engine vs a raw llama-cpp-python loop on the same GGUF, in the same process and run.

Goal: the engine's decode tok/s and TTFT within 3% of raw llama-cpp-python (`Llama.create_completion`,
streaming, same prompt tokens, same sampling). Runs are interleaved (raw, engine, raw, engine, ...) so
load changes on a shared machine hit both sides alike; the medians are compared.

    .venv/bin/python bench/runtime_overhead.py [--model X.gguf] [--rounds 5] [--tokens 64] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from care.models import resolve_gguf
from care.runtime.backend import EngineConfig, SamplingConfig
from care.runtime.engine import ChatEngine


def timed(chunks) -> tuple[float, float, int]:
    """Measured the same way for both sides, from outside: TTFT = first token's arrival, decode tok/s =
    tokens after the first / time from the first to the last arrival."""
    t0 = time.perf_counter()
    stamps = []
    for has_token in chunks:
        if has_token:
            stamps.append(time.perf_counter())
    if not stamps:
        return 0.0, 0.0, 0
    span = max(stamps[-1] - stamps[0], 1e-9)
    return stamps[0] - t0, (len(stamps) - 1) / span, len(stamps)


def raw_chunks(llm, prompt_tokens: list[int], n: int):
    for chunk in llm.create_completion(prompt=prompt_tokens, max_tokens=n, temperature=0.0, top_k=40, top_p=0.9,
                                       repeat_penalty=1.0, stream=True):
        yield chunk["choices"][0]["finish_reason"] is None


def engine_chunks(engine: ChatEngine, messages, sampling: SamplingConfig):
    for chunk in engine.stream(messages, sampling):
        yield chunk.finish_reason is None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    sampling = SamplingConfig(temperature=0.0, top_k=40, top_p=0.9, repeat_penalty=1.0, max_tokens=args.tokens)
    engine = ChatEngine(resolve_gguf(args.model), EngineConfig(n_ctx=2048, n_threads=args.threads, sampling=sampling))
    messages = [{"role": "user", "content": "Explain in detail how to look after a small vegetable garden."}]
    prompt = engine.tokenize(engine.render(messages))
    # The raw loop passes no stop strings; the table's `tokens` column shows both produced the same count.
    rows = {"raw": [], "engine": []}
    for i in range(args.rounds):
        order = ("raw", "engine") if i % 2 == 0 else ("engine", "raw")  # neither side always goes first
        for side in order:
            engine.llm.reset()  # no prefix-cache advantage for either side
            chunks = raw_chunks(engine.llm, prompt, args.tokens) if side == "raw" else engine_chunks(
                engine, messages, sampling)
            rows[side].append(timed(chunks))
    med = {k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v),
               statistics.median(r[2] for r in v)) for k, v in rows.items()}
    print(f"model {engine.path.name}, {args.threads} thread(s), prompt {len(prompt)} tokens, "
          f"{args.rounds} interleaved rounds, medians:")
    print(f"{'':8} {'TTFT s':>8} {'decode tok/s':>13} {'tokens':>7}")
    for k, (ttft, tps, n) in med.items():
        print(f"{k:8} {ttft:8.3f} {tps:13.2f} {n:7.0f}")
    decode_ratio = med["engine"][1] / med["raw"][1]
    ttft_ratio = med["engine"][0] / med["raw"][0]
    verdict = "OK" if decode_ratio >= 0.97 and ttft_ratio <= 1.03 else "OVER the 3% goal"
    print(f"engine/raw: decode {decode_ratio:.3f} (slower by {100 * (1 - decode_ratio):+.1f}%), "
          f"TTFT {ttft_ratio:.3f} ({100 * (ttft_ratio - 1):+.1f}%)  -> {verdict}")
    print(json.dumps({"decode_ratio": decode_ratio, "ttft_ratio": ttft_ratio, "raw": rows["raw"],
                      "engine": rows["engine"]}))
    engine.close()


if __name__ == "__main__":
    main()
