"""Device benchmarks of a GGUF or an ONNX folder: load time, TTFT, prefill and decode tok/s, peak RSS, file size.

Each configuration runs in a fresh child process (care.proc.run_worker: `python -m care.runtime.bench job.json`), so peak RSS is
that configuration's own high-water mark (ru_maxrss), not the largest of everything measured before it.
"""

from __future__ import annotations

import logging
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from care.errors import GenerationError

log = logging.getLogger(__name__)

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
    chat_template: str | None = None  # a NAMED_TEMPLATES name or Jinja text; None: the GGUF's own
    chat_ttft: bool = True  # also time a new chat's first token: no cache, cold (cache built), cached, follow-up
    domain: str = "medical"
    extra: dict[str, Any] = field(default_factory=dict)


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def measure(cfg: BenchConfig) -> dict[str, Any]:
    """Load the model and time one prefill + decode in this process (see run_isolated for clean RSS)."""
    from care.runtime.backend import EngineConfig, SamplingConfig
    from care.runtime.loader import load_engine
    from care.system import default_threads

    rss_before = _peak_rss_bytes()
    threads = cfg.threads or default_threads()
    cache_dir = tempfile.mkdtemp(prefix="care-bench-prompt-cache-")  # empty: the first chat is cold
    engine = load_engine(cfg.model, EngineConfig(
        n_ctx=cfg.n_ctx, n_threads=threads, type_k=cfg.type_k, type_v=cfg.type_v, flash_attn=cfg.flash_attn,
        repack=cfg.repack, use_mmap=cfg.use_mmap, prompt_cache=cfg.chat_ttft, prompt_cache_dir=cache_dir,
        chat_template=cfg.chat_template,
        sampling=SamplingConfig.greedy(cfg.gen_tokens)))
    prompt_cache = getattr(engine, "prompt_cache", None)
    if prompt_cache is not None:
        engine.prompt_cache = None  # the prefill/decode figures are the raw ones
    try:
        text = PROMPT_TEXT
        while len(engine.tokenize(text)) < cfg.prompt_tokens:
            text += PROMPT_TEXT
        ids = engine.tokenize(text)[: cfg.prompt_tokens]
        prompt = engine.detokenize(ids)
        messages = [{"role": "user", "content": prompt + "\nSummarise this advice."}]
        last = None
        for chunk in engine.stream(messages):
            last = chunk
        if last is None or last.ttft_s is None:
            raise GenerationError("The benchmark run produced no tokens")
        result = {
            "model": str(cfg.model), "file_gb": _size(Path(cfg.model)) / 1e9, "quant": engine.quant_type,
            "backend": engine.info().backend,
            "threads": threads, "n_ctx": engine.n_ctx, "type_k": cfg.type_k or "f16", "type_v": cfg.type_v or "f16",
            "flash_attn": cfg.flash_attn, "repack": cfg.repack if cfg.repack is not None else True,
            "use_mmap": cfg.use_mmap,
            "load_s": engine.load_s, "prompt_tokens": last.prompt_tokens, "ttft_s": last.ttft_s,
            "prefill_tok_s": last.prompt_tokens / last.ttft_s, "gen_tokens": last.completion_tokens,
            "decode_tok_s": last.tokens_per_s, "peak_rss_gb": _peak_rss_bytes() / 1e9,
            "rss_before_load_gb": rss_before / 1e9,
        }
        if prompt_cache is not None:
            result.update(_chat_ttft(engine, prompt_cache, cfg.domain))
        if cfg.agreement_tokens:
            if not hasattr(engine, "llm"):
                raise GenerationError("Next-token agreement is measured on GGUF models only")
            result["argmax"] = _teacher_forced_argmax(engine, text, cfg.agreement_tokens)
        return result
    finally:
        engine.close()
        shutil.rmtree(cache_dir, ignore_errors=True)


# Two different ~30-token first questions (Phi-3 / SmolLM2 tokenizers), and a short follow-up.
QUESTIONS = (
    "I have had a mild headache and a slight fever since yesterday evening. What can I do at home, and when "
    "should I see a health worker?",
    "My father has type 2 diabetes and his feet often feel numb and cold. What should we check every day, and "
    "what is a warning sign?",
)
FOLLOW_UP = "Is it safe to take paracetamol for it?"


def _chat_ttft(engine, prompt_cache, domain: str) -> dict[str, Any]:
    """A new chat's first token without the prompt cache, with it cold (evaluated and saved) and cached (loaded
    from the file), then a follow-up turn, which llama-cpp-python's prefix reuse serves. Short replies."""
    from care.domains import system_prompt
    from care.runtime.backend import SamplingConfig
    from care.runtime.prompt_cache import model_sha256

    t0 = time.perf_counter()
    model_sha256(engine.path)  # once per model file (then remembered): not part of any chat's first token
    hash_s = time.perf_counter() - t0
    # One token: the reply ends when the first token is sampled, so elapsed_s is the time to the first token
    # even when llama-cpp-python holds a chunk back (an incomplete UTF-8 byte token of a random-weight model).
    sampling = SamplingConfig.greedy(1)
    system = {"role": "system", "content": system_prompt(domain)}

    def new_chat(question: str, cached: bool):
        engine.prompt_cache = prompt_cache if cached else None
        engine.llm.reset()  # a new conversation: nothing of the last one is reused
        return engine.chat([system, {"role": "user", "content": question}], sampling)

    none = new_chat(QUESTIONS[0], cached=False)
    cold = new_chat(QUESTIONS[0], cached=True)
    hit = new_chat(QUESTIONS[1], cached=True)
    history = [system, {"role": "user", "content": QUESTIONS[1]}, {"role": "assistant", "content": hit.text},
               {"role": "user", "content": FOLLOW_UP}]
    follow = engine.chat(history, sampling)
    engine.prompt_cache = prompt_cache
    if (cold.prompt_cache, hit.prompt_cache) != ("built", "hit"):
        raise GenerationError(f"The prompt cache was not used as expected: cold {cold.prompt_cache}, "
                              f"cached {hit.prompt_cache}")
    return {
        "chat_prefix_tokens": len(prompt_cache.prefix_tokens([system])),
        "chat_question_tokens": hit.prompt_tokens - len(prompt_cache.prefix_tokens([system])),
        "chat_ttft_nocache_s": none.elapsed_s, "chat_ttft_cold_s": cold.elapsed_s, "chat_ttft_cached_s": hit.elapsed_s,
        "chat_prefill_nocache": none.prefill_tokens, "chat_prefill_cached": hit.prefill_tokens,
        "followup_ttft_s": follow.elapsed_s, "followup_prefill": follow.prefill_tokens,
        "followup_prompt_tokens": follow.prompt_tokens, "followup_cache": follow.prompt_cache,
        "model_hash_s": hash_s,
    }


def add_decode_bound(result: dict[str, Any], bandwidth: float) -> dict[str, Any]:
    """Decode against the memory-bandwidth limit: bound = bandwidth / bytes read per token (weights + the KV
    cache at the decode's mean position), fraction = measured decode / bound."""
    from care.runtime.membw import bytes_per_token

    result["bandwidth_gb_s"] = bandwidth / 1e9
    if "error" in result or not str(result.get("model", "")).endswith(".gguf"):
        return result
    n_past = int(result.get("prompt_tokens", 0) + result.get("gen_tokens", 0) / 2)
    per_token = bytes_per_token(Path(result["model"]), n_past, result.get("type_k"), result.get("type_v"))
    bound = bandwidth / per_token["total"]
    result.update({"bytes_per_token_gb": per_token["total"] / 1e9, "kv_bytes_per_token_gb": per_token["kv"] / 1e9,
                   "bound_tok_s": bound, "decode_fraction": result["decode_tok_s"] / bound})
    return result


def _size(path: Path) -> int:
    """Bytes of a GGUF file, or of every file of a model folder (ONNX)."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _teacher_forced_argmax(engine, text: str, n: int) -> list[int]:
    """The model's top-1 next token at each of n positions of a fixed text (for KV-quantization effects)."""
    import numpy as np

    from care.runtime import llama_compat

    llm = engine.llm
    ids = engine.tokenize(text)[: min(n, engine.n_ctx - 1)]
    llm.reset()
    out = []
    for tok in ids:  # one token at a time: every prediction reads the (quantized) KV cache of the rest
        llm.eval([tok])
        out.append(int(np.argmax(llama_compat.logits_ith(llm, -1))))
    llm.reset()
    return out


def run_isolated(cfg: BenchConfig, timeout: float = 1800, ceiling_gb: float | None = None,
                 poll_s: float = 0.02) -> dict[str, Any]:
    """measure() in a fresh child process (care.proc.run_worker); returns its result (or an `error` entry).

    With `ceiling_gb` the child is held to it as a phone's low-memory killer would: its RSS is sampled every
    `poll_s` and the run is stopped the moment it passes the ceiling (`over_ceiling: True`, with the RSS
    seen). RLIMIT_AS is no substitute: it counts the whole mapped GGUF and the allocator's reservations, not
    the memory in use, so it refuses models that fit."""
    import psutil

    from care.errors import WorkerError
    from care.proc import run_worker

    limit = None if ceiling_gb is None else ceiling_gb * 1e9
    seen = [0]

    class OverCeiling(Exception):
        pass

    def watch(pid: int) -> None:
        try:
            seen[0] = max(seen[0], psutil.Process(pid).memory_info().rss)
        except psutil.Error:  # exited between two samples
            return
        if limit is not None and seen[0] > limit:
            raise OverCeiling

    with tempfile.TemporaryDirectory(prefix="care-bench-") as work:
        try:
            result = run_worker("care.runtime.bench", asdict(cfg), workdir=Path(work), timeout=timeout, watch=watch,
                                poll_s=poll_s, what="the benchmark child")
        except OverCeiling:
            return {**asdict(cfg), "over_ceiling": True, "ceiling_gb": ceiling_gb, "peak_rss_gb": seen[0] / 1e9,
                    "error": f"stopped: RSS {seen[0] / 1e9:.3f} GB passed the {ceiling_gb:g} GB ceiling"}
        except WorkerError as exc:
            if exc.timed_out:
                return {**asdict(cfg), "error": f"no result within {timeout:.0f} s"}
            return {**asdict(cfg), "error": exc.detail or exc.message}
    if limit is not None:
        # The child's own high-water mark also catches a spike shorter than one sampling interval.
        result["ceiling_gb"] = ceiling_gb
        result["over_ceiling"] = result["peak_rss_gb"] > ceiling_gb
        result["within_ceiling"] = not result["over_ceiling"]
    return result


def _child(job: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    result = measure(BenchConfig(**job))
    result["child_wall_s"] = time.perf_counter() - t0
    return result


if __name__ == "__main__":
    from care.proc import worker_main

    sys.exit(worker_main(_child))
