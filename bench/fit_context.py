"""Fitting a long history into the context: the shared budget (care.runtime.backend.ContextBudget.fit) vs the
old loop that re-rendered and re-tokenised the whole remaining history once per dropped message.

The case from issue 13: 20 turns of 3,000 words each, on the embedded SmolLM2 GGUF, measured in one run.
Prints seconds and tokenizer calls for both, and the ratio.

    .venv/bin/python bench/fit_context.py [--turns 20] [--words 3000] [--n-ctx 4096]
"""

from __future__ import annotations

import argparse
import time

from care.errors import GenerationError
from care.runtime.backend import EngineConfig, SamplingConfig
from care.runtime.loader import load_engine

SENTENCE = ("the patient reports a mild headache since yesterday and asks whether paracetamol is safe with her "
            "blood pressure tablets")
WORDS = SENTENCE.split(" ")


def old_fit(engine, messages, max_tokens):
    """The loop before issue 13, kept here as the baseline: one full render + tokenisation per dropped turn."""
    kept, dropped = list(messages), 0
    while True:
        tokens = engine.tokenize(engine.render(kept))
        if len(tokens) + max_tokens <= engine.n_ctx:
            return kept, tokens, dropped
        first = next((i for i, m in enumerate(kept) if m["role"] != "system"), None)
        if first is None or first == len(kept) - 1:
            raise GenerationError("too long")
        del kept[first]
        dropped += 1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--turns", type=int, default=20)
    ap.add_argument("--words", type=int, default=3000)
    ap.add_argument("--n-ctx", type=int, default=4096)
    args = ap.parse_args()
    engine = load_engine(None, EngineConfig(n_ctx=args.n_ctx, n_threads=1, sampling=SamplingConfig(max_tokens=256)))
    messages = [{"role": "system", "content": "You are a helpful assistant."}]
    for i in range(args.turns):
        text = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(args.words))
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}: {text}"})
    messages.append({"role": "user", "content": "What should I do now?"})

    calls = {"n": 0}
    real = engine.tokenize

    def counting(text):
        calls["n"] += 1
        return real(text)

    engine.tokenize = counting  # type: ignore[method-assign]
    t0 = time.perf_counter()
    kept_old, tokens_old, dropped_old = old_fit(engine, messages, 256)
    old_s, old_calls = time.perf_counter() - t0, calls["n"]

    calls["n"] = 0
    engine._token_counts.clear() if hasattr(engine, "_token_counts") else None  # a cold cache: the first request
    t0 = time.perf_counter()
    kept, tokens, dropped = engine.fit(messages, 256)
    new_s, new_calls = time.perf_counter() - t0, calls["n"]
    t0 = time.perf_counter()
    engine.fit([*messages, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "and then?"}], 256)
    warm_s = time.perf_counter() - t0
    same = (kept == kept_old and tokens == tokens_old and dropped == dropped_old)
    print(f"history: {args.turns} turns x {args.words} words, n_ctx {args.n_ctx}; kept {len(kept)} messages, "
          f"dropped {dropped}; same result as the old loop: {same}")
    print(f"old loop : {old_s:8.3f} s, {old_calls} full-prompt tokenisations")
    print(f"new fit  : {new_s:8.3f} s, {new_calls} prompt tokenisations (+ one count per message it could keep, cached)")
    print(f"next turn: {warm_s:8.3f} s (cached message counts)")
    print(f"speed-up : {old_s / max(new_s, 1e-9):.1f}x")
    engine.close()


if __name__ == "__main__":
    main()
