"""Greedy tokens of a GGUF through llama-cpp-python, as JSON on stdout.

The slow portability tests run this script natively and under `qemu-x86_64 -cpu <older CPU>` and compare the
tokens; it also reports which ggml CPU-variant module the process loaded (from /proc/self/maps).
Usage: python portable_greedy.py MODEL.gguf N_TOKENS PROMPT [FORCED_TOKENS]
With FORCED_TOKENS (comma-separated ids, another machine's greedy tokens), those tokens are fed one by one
(teacher forcing) instead of the greedy choice, so two builds' logits are compared on the same sequence.
Each step also reports its TOP_K logits (ids and values).
"""

from __future__ import annotations

import json
import re
import sys

from care.runtime import llama_compat

TOP_K = 10


def main() -> int:
    model, n_tokens, prompt = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    forced = [int(t) for t in sys.argv[4].split(",")] if len(sys.argv) > 4 and sys.argv[4] else None
    llama_cpp = llama_compat.load()
    import numpy as np

    llm = llama_cpp.Llama(model_path=model, n_ctx=128, n_batch=64, n_threads=1, verbose=False)
    # As llama.cpp's llama-simple does it: special tokens on, the model's BOS if it wants one.
    prompt_tokens = llm.tokenize(prompt.encode(), add_bos=True, special=True)
    tokens: list[int] = []
    runner_up: list[int] = []  # the second-best token at each step, and its logit gap to the chosen one
    margins: list[float] = []
    top: list[list[list[float]]] = []  # per step: [ids, logits] of the TOP_K best

    def record(tok: int) -> None:
        tokens.append(tok)
        # the logits this token was picked from (the last decode's; llama-cpp-python keeps no copy)
        row = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))
        best = row.argsort()[::-1][:TOP_K]
        top.append([[int(i) for i in best], [float(row[i]) for i in best]])
        second = int(best[1]) if int(best[0]) == tok else int(best[0])
        runner_up.append(second)
        margins.append(float(row[tok] - row[second]))

    if forced is None:
        for tok in llm.generate(prompt_tokens, temp=0.0, top_k=1, repeat_penalty=1.0):
            if tok == llm.token_eos() or len(tokens) == n_tokens:
                break
            record(tok)
    else:
        llm.eval(prompt_tokens)
        for tok in forced[:n_tokens]:
            record(tok)
            llm.eval([tok])
    with open("/proc/self/maps", encoding="utf-8") as fh:
        variants = sorted(set(re.findall(r"libggml-cpu-([\w.]+?)\.so", fh.read())))

    def piece(tok: int) -> str:
        return llm.detokenize([tok], special=True).decode("utf-8", errors="replace")

    json.dump({"prompt_tokens": prompt_tokens, "tokens": tokens, "pieces": [piece(t) for t in tokens],
               "runner_up": [piece(t) for t in runner_up], "margins": margins, "top": top,
               "echo": "".join(piece(t) for t in prompt_tokens), "cpu_variants": variants}, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
