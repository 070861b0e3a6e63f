"""Device benchmarks of a GGUF: load time, TTFT, prefill and decode tok/s, peak RSS, file size.

Each configuration runs in a fresh child process (`python -m care.runtime.bench '<json>'`), so peak RSS is
that configuration's own high-water mark (ru_maxrss), not the largest of everything measured before it.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from care.errors import GenerationError

log = logging.getLogger(__name__)

# Profiles for `care bench`. phone: 2 threads, a 4 GB ceiling; the KV/repack choices come from the
# trade-off table of bench/phone_profile.py (README): q8_0 K/V + flash attention halve the KV cache at no
# measured decode cost; no repacked weight copy saves its size in RSS.
PROFILES: dict[str, dict[str, Any]] = {
    "laptop": {"threads": None, "n_ctx": 4096, "ceiling_gb": None, "type_k": None, "type_v": None,
               "flash_attn": None, "repack": None},
    "phone": {"threads": 2, "n_ctx": 4096, "ceiling_gb": 4.0, "type_k": "q8_0", "type_v": "q8_0",
              "flash_attn": True, "repack": False},
}

PROMPT_TEXT = (
    "A patient asks about managing type 2 diabetes at home: checking blood sugar, eating regular meals with "
    "vegetables and whole grains, walking every day, taking metformin as prescribed, looking after the feet, "
    "and knowing the warning signs of very high or very low blood sugar that need a health worker. "
)


@dataclass
class BenchConfig:
    model: str
    n_ctx: int = 4096
    threads: int | None = None
    type_k: str | None = None
    type_v: str | None = None
    flash_attn: bool | None = None
    repack: bool | None = None
    use_mmap: bool = True
    prompt_tokens: int = 256
    gen_tokens: int = 64
    agreement_tokens: int = 0  # >0: also return the greedy next-token argmax ids over that many tokens
    extra: dict[str, Any] = field(default_factory=dict)


def physical_cores() -> int:
    try:
        import psutil

        n = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        n = os.cpu_count() or 1
    if hasattr(os, "sched_getaffinity"):
        n = min(n, len(os.sched_getaffinity(0)))
    return n


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def measure(cfg: BenchConfig) -> dict[str, Any]:
    """Load the model and time one prefill + decode in this process (see run_isolated for clean RSS)."""
    from care.runtime.engine import ChatEngine, EngineConfig, SamplingConfig, default_threads

    rss_before = _peak_rss_bytes()
    threads = cfg.threads or default_threads()
    engine = ChatEngine(cfg.model, EngineConfig(
        n_ctx=cfg.n_ctx, n_threads=threads, type_k=cfg.type_k, type_v=cfg.type_v, flash_attn=cfg.flash_attn,
        repack=cfg.repack, use_mmap=cfg.use_mmap,
        sampling=SamplingConfig(temperature=0.0, seed=0, max_tokens=cfg.gen_tokens, repeat_penalty=1.0)))
    try:
        text = PROMPT_TEXT
        while len(engine.tokenize(text)) < cfg.prompt_tokens:
            text += PROMPT_TEXT
        ids = engine.tokenize(text)[: cfg.prompt_tokens]
        prompt = engine.llm.detokenize(ids).decode("utf-8", errors="ignore")
        messages = [{"role": "user", "content": prompt + "\nSummarise this advice."}]
        last = None
        for chunk in engine.stream(messages):
            last = chunk
        if last is None or last.ttft_s is None:
            raise GenerationError("The benchmark run produced no tokens")
        result = {
            "model": str(cfg.model), "file_gb": Path(cfg.model).stat().st_size / 1e9, "quant": engine.quant_type,
            "threads": threads, "n_ctx": engine.n_ctx, "type_k": cfg.type_k or "f16", "type_v": cfg.type_v or "f16",
            "flash_attn": cfg.flash_attn, "repack": cfg.repack if cfg.repack is not None else True,
            "load_s": engine.load_s, "prompt_tokens": last.prompt_tokens, "ttft_s": last.ttft_s,
            "prefill_tok_s": last.prompt_tokens / last.ttft_s, "gen_tokens": last.completion_tokens,
            "decode_tok_s": last.tokens_per_s, "peak_rss_gb": _peak_rss_bytes() / 1e9,
            "rss_before_load_gb": rss_before / 1e9,
        }
        if cfg.agreement_tokens:
            result["argmax"] = _teacher_forced_argmax(engine, text, cfg.agreement_tokens)
        return result
    finally:
        engine.close()


def _teacher_forced_argmax(engine, text: str, n: int) -> list[int]:
    """The model's top-1 next token at each of n positions of a fixed text (for KV-quantization effects)."""
    import numpy as np

    llm = engine.llm
    ids = engine.tokenize(text)[: min(n, engine.n_ctx - 1)]
    llm.reset()
    out = []
    for tok in ids:  # one token at a time: every prediction reads the (quantized) KV cache of the rest
        llm.eval([tok])
        out.append(int(np.argmax(llm._ctx.get_logits_ith(-1)[: llm.n_vocab()])))
    llm.reset()
    return out


def run_isolated(cfg: BenchConfig, timeout: float = 1800) -> dict[str, Any]:
    """measure() in a fresh child process; returns its JSON result (or an `error` entry)."""
    payload = json.dumps(asdict(cfg))
    proc = subprocess.run([sys.executable, "-m", "care.runtime.bench", payload], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {**asdict(cfg), "error": tail[0]}
    return json.loads(lines[-1])


def _child(payload: str) -> int:
    cfg = BenchConfig(**json.loads(payload))
    t0 = time.perf_counter()
    result = measure(cfg)
    result["child_wall_s"] = time.perf_counter() - t0
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1]))
