"""What every chat engine offers (`ChatBackend`), the settings it loads with, and the one context budget.

The llama.cpp engine (care.runtime.engine), the ONNX engine (care.runtime.onnx_engine) and the tests' fake
engine (care.tui.testing) all inherit `ContextBudget`, so the history is trimmed to n_ctx by one piece of
code. No llama.cpp, onnxruntime or torch import here: front ends type against this module.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from care.errors import GenerationError

Message = dict[str, str]


@dataclass
class SamplingConfig:
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 40
    repeat_penalty: float = 1.1
    seed: int | None = None
    max_tokens: int = 512
    stop: tuple[str, ...] = ()  # extra stop strings (OpenAI `stop`), on top of the model's end-of-turn ones
    # Constrain the reply to a JSON value: {} for any JSON object, or a JSON schema (OpenAI response_format).
    # The llama.cpp engine turns it into a grammar; an engine without grammar support refuses it.
    json_schema: dict[str, Any] | None = None
    # LoRA adapters for this request as (name, scale) pairs (care.runtime.adapters); () the base alone, None the
    # engine's default. Only engines loaded with EngineConfig.adapters accept names.
    adapters: tuple[tuple[str, float], ...] | None = None

    @classmethod
    def greedy(cls, max_tokens: int, **overrides: Any) -> SamplingConfig:
        """Deterministic decoding for measurements and checks (bench, eval, export verification): the most
        likely token each step, no repetition penalty, seed 0."""
        return cls(**{"temperature": 0.0, "top_k": 1, "repeat_penalty": 1.0, "seed": 0, "max_tokens": max_tokens,
                      **overrides})


@dataclass
class EngineConfig:
    n_ctx: int = 4096  # phone-sensible; never the model's 128k maximum
    n_threads: int | None = None  # None: the idle physical cores
    n_batch: int = 512
    use_mmap: bool = True
    lora_path: str | None = None  # a GGUF LoRA adapter applied at load time (llama.cpp engine)
    lora_scale: float = 1.0  # its strength (llama.cpp's lora_scale)
    adapters: dict[str, str] | None = None  # name -> GGUF LoRA, loaded once, switched per request (llama.cpp)
    chat_template: str | None = None  # a template name from NAMED_TEMPLATES or Jinja text; None: the model's
    type_k: str | None = None  # KV-cache quantization, e.g. "q8_0"
    type_v: str | None = None
    flash_attn: bool | None = None
    repack: bool | None = None  # llama.cpp's repacked copy of quantized weights (faster matmuls, more RSS)
    # What a conversation does with turns that no longer fit n_ctx (care.runtime.session): "drop" them, or
    # "summarize" them with the model into a short summary that stays in the system prompt.
    context_policy: str = "drop"
    summary_tokens: int = 160  # the most tokens a summary may take
    # Save the KV state of every chat's fixed opening (template + system prompt) and load it for new chats
    # (care.runtime.prompt_cache); None: a folder next to the model, or the care cache.
    prompt_cache: bool = True
    prompt_cache_dir: str | None = None
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


@dataclass
class GenerationResponse:
    """One streamed chunk, or (with finish_reason set) the last one with the run's totals."""

    text: str
    finish_reason: str | None = None  # None while streaming; "stop", "length", "cancelled"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float | None = None
    tokens_per_s: float = 0.0
    elapsed_s: float = 0.0
    dropped_turns: int = 0  # older turns left out to fit the context
    prefill_tokens: int = 0  # prompt tokens actually evaluated; the rest came from the cache or the last turn
    prompt_cache: str = "none"  # the saved opening: "hit" (loaded), "built", "live" (kept from last turn)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ModelInfo:
    """What a front end shows about the loaded model (status bar, /v1/models, bench tables)."""

    name: str
    backend: str  # "llama.cpp", "onnx", "fake"
    quant: str
    n_ctx: int
    path: str
    load_s: float = 0.0


def collect(chunks: Iterable[GenerationResponse]) -> GenerationResponse:
    """Join a stream into one response: the final chunk's totals with the whole text."""
    parts: list[str] = []
    last = GenerationResponse(text="")
    for chunk in chunks:
        parts.append(chunk.text)
        last = chunk
    last.text = "".join(parts)
    return last


@runtime_checkable
class ChatBackend(Protocol):
    """A loaded chat model, as the CLI, the TUI, ChatSession, the server, eval and bench use it."""

    config: EngineConfig
    path: Path
    load_s: float

    @property
    def n_ctx(self) -> int: ...
    @property
    def model_name(self) -> str: ...
    @property
    def quant_type(self) -> str: ...
    def info(self) -> ModelInfo: ...
    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str: ...
    def tokenize(self, text: str) -> list[int]: ...
    def detokenize(self, ids: Sequence[int]) -> str: ...
    def count_tokens(self, text: str) -> int: ...
    def fit(self, messages: Sequence[Message], max_tokens: int) -> tuple[list[Message], list[int], int]: ...
    def stream(self, messages: Sequence[Message],
               sampling: SamplingConfig | None = None) -> Iterator[GenerationResponse]: ...
    def generate(self, messages: Sequence[Message], sampling: SamplingConfig | None = None) -> GenerationResponse: ...
    def cancel(self) -> None: ...
    def close(self) -> None: ...


class ContextBudget:
    """The context budget and the shared conveniences of every engine.

    A subclass provides render / tokenize / n_ctx / stream (and may override count_tokens with a cheaper
    count of a bare text). fit() costs at most one tokenisation per distinct message text (cached per engine;
    turns that certainly cannot fit are never tokenised), plus one or two of the prompt that is finally kept,
    so a long history is trimmed in linear time instead of re-rendering and re-tokenising the whole
    conversation once per dropped message.
    """

    backend_name = "unknown"
    TOKEN_CACHE_SIZE = 4096  # message texts whose token counts are kept (a few MB at most)
    # Tokens count_tokens() may over-count per text (a BOS that tokenize() adds); the lower bound allows for it.
    COUNT_SLACK = 1.0

    # -- model facts shared by the engines -----------------------------------------------------------
    def info(self) -> ModelInfo:
        return ModelInfo(name=self.model_name, backend=self.backend_name, quant=self.quant_type,  # type: ignore[attr-defined]
                         n_ctx=self.n_ctx, path=str(getattr(self, "path", "")),  # type: ignore[attr-defined]
                         load_s=float(getattr(self, "load_s", 0.0) or 0.0))

    def generate(self, messages: Sequence[Message], sampling: SamplingConfig | None = None) -> GenerationResponse:
        """Generate a whole reply; returns the final chunk with the full text."""
        return collect(self.stream(messages, sampling))  # type: ignore[attr-defined]

    def chat(self, messages: Sequence[Message], sampling: SamplingConfig | None = None) -> GenerationResponse:
        return self.generate(messages, sampling)

    # -- budget ----------------------------------------------------------------------------------------
    def count_tokens(self, text: str) -> int:
        """Tokens of a bare text (no BOS, no template); a lower bound of what it adds to a prompt."""
        return len(self.tokenize(text))  # type: ignore[attr-defined]

    def _message_tokens(self, text: str) -> int:
        cache: OrderedDict[str, int] = self.__dict__.setdefault("_token_counts", OrderedDict())
        lock: threading.Lock = self.__dict__.setdefault("_token_counts_lock", threading.Lock())
        with lock:
            if text in cache:
                cache.move_to_end(text)
                return cache[text]
        n = self.count_tokens(text)
        with lock:
            cache[text] = n
            while len(cache) > self.TOKEN_CACHE_SIZE:
                cache.popitem(last=False)
        return n

    def fit(self, messages: Sequence[Message], max_tokens: int) -> tuple[list[Message], list[int], int]:
        """Drop the oldest non-system turns until prompt + reply budget fits n_ctx.

        Returns (messages kept, prompt tokens, number of messages dropped). The newest message always
        stays; when it alone does not fit, GenerationError says so."""
        kept = list(messages)
        n_ctx: int = self.n_ctx  # type: ignore[attr-defined]
        budget = n_ctx - max_tokens
        last = len(kept) - 1
        order = [i for i, m in enumerate(kept) if m["role"] != "system" and i != last]  # oldest first
        droppable = set(order)
        slack = self.COUNT_SLACK
        required = sum(self._message_tokens(m["content"]) for i, m in enumerate(kept) if i not in droppable)
        # rest[d]: content tokens of order[d:]. Counted newest first and only while the bare texts could still
        # fit, so an over-long history costs what it keeps (plus one message), not what it drops.
        rest = [0] * (len(order) + 1)
        low = len(order)  # the fewest drops whose messages are counted; fewer than that never fit
        while low > 0:
            with_older = rest[low] + self._message_tokens(kept[order[low - 1]]["content"])
            if required + with_older - slack * (len(kept) - low + 1) > budget:
                break
            low -= 1
            rest[low] = with_older

        def estimate(d: int, per_message: float) -> float:
            return required + rest[d] + per_message * (len(kept) - d)

        def first_fitting(per_message: float) -> int:
            return next((d for d in range(low, len(order) + 1) if estimate(d, per_message) <= budget), len(order))

        exact: dict[int, list[int]] = {}

        def prompt(d: int) -> list[int]:
            if d not in exact:
                dropped = set(order[:d])
                exact[d] = self.tokenize(self.render([m for i, m in enumerate(kept) if i not in dropped]))  # type: ignore[attr-defined]
            return exact[d]

        # The bare texts are a lower bound (the template only adds tokens): fewer drops than this never fit.
        floor = first_fitting(-self.COUNT_SLACK)
        d = first_fitting(0.0)
        if len(prompt(d)) > budget and len(kept) > d:
            # Learn the template's cost per message from this one exact count, then jump close to the answer.
            per_message = (len(prompt(d)) - estimate(d, 0.0)) / (len(kept) - d)
            d = max(d + 1, first_fitting(per_message))
            d = min(d, len(order))
        while len(prompt(d)) > budget:
            if d >= len(order):
                tokens = prompt(d)
                if budget > 8:
                    raise GenerationError(
                        f"The message is too long: {len(tokens)} tokens, the context allows {budget}",
                        hint="Shorten it, lower --max-tokens, or raise --n-ctx",
                    )
                raise GenerationError(
                    f"--max-tokens {max_tokens} leaves no room in the {n_ctx}-token context",
                    hint="Lower --max-tokens or raise --n-ctx",
                )
            d += 1
        while d > floor and len(prompt(d - 1)) <= budget:  # a jump may overshoot: keep every turn that fits
            d -= 1
        dropped_ids = set(order[:d])
        return [m for i, m in enumerate(kept) if i not in dropped_ids], prompt(d), d
