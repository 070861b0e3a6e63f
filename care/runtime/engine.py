"""The llama.cpp chat engine every front end (CLI, TUI, server, eval) uses.

Formatting comes from the GGUF's own chat template (never llama-cpp-python's silent Llama-2 fallback),
generation streams `GenerationResponse` chunks, can be cancelled from another thread, and the history
is trimmed to the context budget instead of crashing at n_ctx.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from care.errors import GenerationError, InvalidModelError, require
from care.gguf_file import file_type_name
from care.models import check_gguf
from care.runtime import llama_compat
from care.runtime.backend import (
    ContextBudget,
    EngineConfig,
    GenerationResponse,
    Message,
    SamplingConfig,
)
from care.system import default_threads

log = logging.getLogger(__name__)

__all__ = ["END_OF_TURN_STRINGS", "NAMED_TEMPLATES", "ChatEngine"]

# Strings that end a turn in the chat formats we support. llama.cpp already stops on the vocabulary's
# end-of-generation tokens (EOS/EOT, Phi-3.5's <|end|>); these catch models whose GGUF marks them poorly.
END_OF_TURN_STRINGS = ("<|end|>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<end_of_turn>")

# Named templates a user may choose with --chat-template for a GGUF that carries none.
NAMED_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
        "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "phi3": (
        "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
        "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
}


class ChatEngine(ContextBudget):
    """A GGUF model loaded with llama-cpp-python, formatted by its own chat template."""

    backend_name = "llama.cpp"
    COUNT_SLACK = 0.0  # count_tokens() below adds no BOS

    def __init__(self, model_path: str | os.PathLike[str], config: EngineConfig | None = None) -> None:
        require("llama_cpp", "runtime")
        llama_cpp = llama_compat.load()

        self.path = check_gguf(Path(model_path))
        self.config = config or EngineConfig()
        self.n_threads = self.config.n_threads or default_threads()
        kwargs: dict[str, Any] = {}
        for name in ("type_k", "type_v"):
            value = getattr(self.config, name)
            if value:
                kwargs[name] = llama_compat.ggml_type(value)
        if self.config.flash_attn is not None:
            kwargs["flash_attn"] = self.config.flash_attn
        t0 = time.perf_counter()
        try:
            with llama_compat.model_params(repack=self.config.repack):
                self.llm = llama_cpp.Llama(
                    model_path=str(self.path),
                    n_ctx=self.config.n_ctx,
                    n_threads=self.n_threads,
                    n_threads_batch=self.n_threads,
                    n_batch=min(self.config.n_batch, self.config.n_ctx),
                    use_mmap=self.config.use_mmap,
                    lora_path=self.config.lora_path,
                    lora_scale=self.config.lora_scale,
                    seed=self.config.sampling.seed if self.config.sampling.seed is not None else 0xFFFFFFFF,
                    verbose=bool(os.environ.get("CARE_DEBUG")),
                    **kwargs,
                )
        except (ValueError, RuntimeError) as exc:
            raise InvalidModelError(
                f"llama.cpp could not load the model: {exc}",
                path=self.path,
                hint="Check that the file is a complete GGUF (re-export it with `care export gguf`)",
            ) from exc
        self.adapters = None
        self.default_adapters: tuple[tuple[str, float], ...] = ()
        if self.config.adapters:
            from care.runtime.adapters import AdapterSet

            if self.config.lora_path:  # switching replaces the context's adapters, --lora's too
                self.llm.close()
                from care.errors import UsageError

                raise UsageError("--lora and --adapters cannot be combined",
                                 hint="Name the --lora file in --adapters too (NAME=FILE)")

            try:
                self.adapters = AdapterSet(self.llm, self.config.adapters)
            except Exception:
                self.llm.close()
                raise
        self.load_s = time.perf_counter() - t0
        self.metadata: dict[str, str] = dict(self.llm.metadata or {})
        self.template = self._pick_template()
        self._formatter = self._make_formatter()
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._evaluated = _count_evals(self.llm)
        self.prompt_cache = None
        # A saved KV state belongs to the adapters it was computed under; with switchable adapters the state is
        # reset on every switch (care.runtime.adapters), so the persistent cache stays off rather than risk
        # loading a prefix computed under another adapter.
        if self.config.prompt_cache and self.adapters is None:
            from care.runtime.prompt_cache import PromptCache

            folder = self.config.prompt_cache_dir
            self.prompt_cache = PromptCache(self, Path(folder) if folder else None)

    # -- model facts -------------------------------------------------------------------------------
    @property
    def n_ctx(self) -> int:
        # llama.cpp pads the context up (160 -> 256) but llama-cpp-python sizes its token buffers with the
        # requested value: budgeting with the padded one overflows them (ValueError in eval).
        return min(self.llm.n_ctx(), int(self.llm.context_params.n_ctx))

    @property
    def model_name(self) -> str:
        return self.metadata.get("general.name") or self.path.stem

    @property
    def quant_type(self) -> str:
        """The file's dominant weight type, e.g. Q4_K_M, from general.file_type."""
        return file_type_name(self.metadata.get("general.file_type")) or "unknown"

    def token_text(self, token_id: int) -> str:
        return self.llm.detokenize([token_id], special=True).decode("utf-8", errors="replace")

    @property
    def stop_strings(self) -> list[str]:
        stops = {self.token_text(self.llm.token_eos())}
        eot = llama_compat.token_eot(self.llm)
        if eot >= 0:
            stops.add(self.token_text(eot))
        stops.update(s for s in END_OF_TURN_STRINGS if s in self.template)
        stops.add("<|endoftext|>")  # Phi-3.5 and GPT-style models end documents with it
        return sorted(s for s in stops if s)

    @functools.cached_property
    def _text_stops(self) -> list[str]:
        """Stop strings llama.cpp does not already stop on as end-of-generation tokens.

        llama-cpp-python re-detokenizes the whole reply at every token to look for stop strings, which
        cost ~6% of decode speed here; a string that is one EOG token of the vocabulary needs no such check."""
        out = []
        for text in self.stop_strings:
            ids = self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
            if not (len(ids) == 1 and llama_compat.is_eog(self.llm, ids[0])):
                out.append(text)
        return out

    def _pick_template(self) -> str:
        chosen = self.config.chat_template
        if chosen:
            return NAMED_TEMPLATES.get(chosen, chosen)
        template = self.metadata.get("tokenizer.chat_template")
        if not template:
            names = ", ".join(NAMED_TEMPLATES)
            raise InvalidModelError(
                "The GGUF has no chat template",
                path=self.path,
                hint=f"Choose one with --chat-template NAME ({names}) or re-export the model with its template",
            )
        return template

    def _make_formatter(self):
        Jinja2ChatFormatter = llama_compat.submodule("llama_chat_format").Jinja2ChatFormatter

        return Jinja2ChatFormatter(
            template=self.template,
            eos_token=self.token_text(self.llm.token_eos()),
            bos_token=self.token_text(self.llm.token_bos()),
            stop_token_ids=[self.llm.token_eos()],
        )

    # -- prompt building ---------------------------------------------------------------------------
    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """The prompt text exactly as the model's chat template renders it."""
        return llama_compat.render_template(self._formatter, messages, add_generation_prompt=add_generation_prompt,
                                            raise_exception=_raise)

    def tokenize(self, text: str) -> list[int]:
        """Tokens of a rendered prompt; BOS added only if the model wants it and the template did not."""
        bos = self.token_text(self.llm.token_bos())
        add_bos = not (bos and text.startswith(bos))
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.llm.detokenize(list(ids)).decode("utf-8", errors="ignore")

    def count_tokens(self, text: str) -> int:
        """Tokens of a bare message text (no BOS, special tokens as text): the budget's per-message count."""
        return len(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    # -- generation --------------------------------------------------------------------------------
    def cancel(self) -> None:
        """Stop the generation in progress (safe from any thread); the engine stays usable."""
        self._cancel.set()

    def stream(
        self, messages: Sequence[Message], sampling: SamplingConfig | None = None
    ) -> Iterator[GenerationResponse]:
        s = sampling or self.config.sampling
        with self._lock:
            self._cancel.clear()
            kept, prompt_tokens, dropped = self.fit(messages, s.max_tokens)
            if dropped:
                log.info("dropped %d older messages to fit the %d-token context", dropped, self.n_ctx)
            t0 = time.perf_counter()
            ttft = None
            n_out = 0
            finish = "stop"
            if s.seed is not None:
                self.llm.set_seed(s.seed)
            self._apply_adapters(s.adapters)
            evaluated_before = self._evaluated[0]
            if self.prompt_cache is not None:
                try:
                    self.prompt_cache.prepare(kept, prompt_tokens)
                except Exception as exc:  # noqa: BLE001 - a cache must never cost the reply: prefill it all
                    log.warning("prompt cache skipped: %s", exc)
                    self.prompt_cache.last = "none"
                    self.llm.reset()
            gen = self.llm.create_completion(
                prompt=prompt_tokens,
                max_tokens=s.max_tokens,
                temperature=s.temperature,
                top_p=s.top_p,
                top_k=s.top_k,
                repeat_penalty=s.repeat_penalty,
                stop=[*self._text_stops, *s.stop] or None,
                grammar=_json_grammar(s.json_schema),
                stream=True,
            )
            try:
                for chunk in gen:
                    choice = chunk["choices"][0]
                    if self._cancel.is_set():
                        finish = "cancelled"
                        break
                    n_out += 1
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    if choice["text"]:
                        yield GenerationResponse(text=choice["text"], prompt_tokens=len(prompt_tokens),
                                                 completion_tokens=n_out, ttft_s=ttft, dropped_turns=dropped)
                    if choice.get("finish_reason"):
                        finish = choice["finish_reason"]
                        break
            finally:
                gen.close()
            elapsed = time.perf_counter() - t0
            # Tokens actually decoded: the context grew by prompt + generated (the last sampled token is
            # not evaluated). Chunks under-count when llama-cpp-python holds text back for stop strings.
            n_gen = max(n_out, self.llm.n_tokens - len(prompt_tokens) + (0 if finish == "cancelled" else 1))
            n_gen = min(n_gen, s.max_tokens)
            # Generated tokens are evaluated one by one and stay in the context; the rest was prompt.
            prefill = self._evaluated[0] - evaluated_before - max(0, self.llm.n_tokens - len(prompt_tokens))
            decode_s = max(elapsed - (ttft or 0.0), 1e-9)
            yield GenerationResponse(
                text="",
                finish_reason=finish,
                prompt_tokens=len(prompt_tokens),
                completion_tokens=n_gen,
                ttft_s=ttft,
                tokens_per_s=(n_gen - 1) / decode_s if n_gen > 1 else 0.0,
                elapsed_s=elapsed,
                dropped_turns=dropped,
                prefill_tokens=prefill,
                prompt_cache=self.prompt_cache.last if self.prompt_cache is not None else "none",
            )

    # -- LoRA adapters (care.runtime.adapters) -------------------------------------------------------------
    @property
    def adapter_names(self) -> tuple[str, ...]:
        return self.adapters.names if self.adapters is not None else ()

    @property
    def active_adapter(self) -> str:
        """The adapters the last reply used ("" for the base alone), for status lines."""
        active = self.adapters.active if self.adapters is not None else ()
        return ",".join(n if s == 1.0 else f"{n}x{s:g}" for n, s in active)

    def adapters_for(self, domain: str) -> tuple[tuple[str, float], ...]:
        """The adapter named like `domain`, else none (the base)."""
        return ((domain, 1.0),) if domain in self.adapter_names else ()

    def _apply_adapters(self, spec: tuple[tuple[str, float], ...] | None) -> None:
        if self.adapters is None:
            if spec:
                from care.errors import UsageError

                raise UsageError("This model was loaded without adapters", hint="Start it with --adapters NAME=FILE")
            return
        self.adapters.apply(self.default_adapters if spec is None else spec)

    def close(self) -> None:
        adapters = getattr(self, "adapters", None)
        if adapters is not None:
            adapters.close()
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.close()


def _count_evals(llm: Any) -> list[int]:
    """Count the tokens llama-cpp-python evaluates (its generate() calls eval), so a reply can report how
    much of its prompt was really prefilled and how much the prefix reuse saved."""
    counter = [0]
    original = llm.eval

    def counting_eval(tokens):
        counter[0] += len(tokens)
        return original(tokens)

    llm.eval = counting_eval
    return counter


@functools.lru_cache(maxsize=32)
def _grammar_for(schema_json: str) -> Any:
    grammar = llama_compat.submodule("llama_grammar")
    JSON_GBNF, LlamaGrammar = grammar.JSON_GBNF, grammar.LlamaGrammar

    try:
        if schema_json == "{}":  # json_object: any JSON object
            return LlamaGrammar.from_string(JSON_GBNF, verbose=False)
        return LlamaGrammar.from_json_schema(schema_json, verbose=False)
    except (ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise GenerationError(f"The JSON schema cannot be turned into a grammar: {exc}",
                              hint="Use a simpler schema (types, properties, required, enum, arrays)") from exc


def _json_grammar(schema: dict[str, Any] | None) -> Any:
    """llama.cpp's grammar for a JSON schema (the reply can only be JSON that matches it); None: free text."""
    if schema is None:
        return None
    return _grammar_for(json.dumps(schema, sort_keys=True))


def _raise(message: str) -> None:
    raise GenerationError(f"The chat template refused the conversation: {message}")
