"""Greedy tokens of a GGUF through llama-cpp-python, as JSON on stdout.

The slow portability tests run this script natively and under `qemu-x86_64 -cpu <older CPU>` and compare the
tokens; it also reports which ggml CPU-variant module the process loaded (from /proc/self/maps).
Usage: python portable_greedy.py MODEL.gguf N_TOKENS PROMPT
"""

from __future__ import annotations

import json
import re
import sys

from care.runtime import llama_compat


def main() -> int:
    model, n_tokens, prompt = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    llama_cpp = llama_compat.load()
    import numpy as np

    llm = llama_cpp.Llama(model_path=model, n_ctx=128, n_batch=64, n_threads=1, verbose=False)
    # As llama.cpp's llama-simple does it: special tokens on, the model's BOS if it wants one.
    prompt_tokens = llm.tokenize(prompt.encode(), add_bos=True, special=True)
    tokens: list[int] = []
    runner_up: list[int] = []  # the second-best token at each step, and its logit gap to the chosen one
    margins: list[float] = []
    for tok in llm.generate(prompt_tokens, temp=0.0, top_k=1, repeat_penalty=1.0):
        if tok == llm.token_eos() or len(tokens) == n_tokens:
            break
        tokens.append(tok)
        # the logits this token was picked from (the last decode's; llama-cpp-python keeps no copy)
        row = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))
        second = int(row.argsort()[-2])
        runner_up.append(second)
        margins.append(float(row[tok] - row[second]))
    with open("/proc/self/maps", encoding="utf-8") as fh:
        variants = sorted(set(re.findall(r"libggml-cpu-([\w.]+?)\.so", fh.read())))

    def piece(tok: int) -> str:
        return llm.detokenize([tok], special=True).decode("utf-8", errors="replace")

    json.dump({"prompt_tokens": prompt_tokens, "tokens": tokens, "pieces": [piece(t) for t in tokens],
               "runner_up": [piece(t) for t in runner_up], "margins": margins,
               "echo": "".join(piece(t) for t in prompt_tokens), "cpu_variants": variants}, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
