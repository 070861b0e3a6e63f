"""The one door to llama-cpp-python: `load()` imports it after the CPU guard chose the CPU module, and every
use of the binding's internals goes through a named function here.

Every care module, bench script and test that needs llama_cpp calls `llama_compat.load()` instead of
`import llama_cpp` (tests/test_layers.py checks that), so no process can load a ggml CPU module that was
not proven to run on this machine (care/runtime/cpu_guard.py). The children of the guard itself
(care/runtime/cpu_probe.py) are the one exception: they are the proof.

The binding's private attributes CARE relies on (`Llama._model`, `Llama._ctx`, `Llama._requires_eval`,
`Jinja2ChatFormatter._environment`, the module `llama_cpp._logger`) and the raw `llama_cpp.llama_*` calls on their handles are read only here,
so a llama-cpp-python update is checked (and fixed) in this one file. They are those of llama-cpp-python 0.3.x
as pinned in pyproject.toml (">=0.3.36,<0.4": 0.3.36 is the version constraints.txt installs and the
portable wheel is built from; 0.3.36 renamed the adapter calls to llama_set_adapters_lora, and 0.4 may move
any of these):

    model_handle(llm)            the llama_model* (llm._model.model)
    ctx_handle(llm)              the llama_context* (llm._ctx.ctx), None once closed
    vocab(llm)                   the llama_vocab* (llm._model.vocab)
    token_eot(llm)               the end-of-turn token id, -1 if the vocabulary has none
    n_ctx_train(llm)             the context length the model was trained with, 0 if unknown
    is_eog(llm, token)           whether `token` ends generation (EOS, EOT, Phi-3.5's <|end|>, ...)
    logits_ith(llm, i)           the logits row of the i-th token of the last batch (-1: the last), a numpy view
    clear_kv(llm)                drop every sequence's KV cache
    state_get(llm) / state_set(llm, payload)   one sequence's KV state as bytes (the prompt cache)
    mark_evaluated(llm, tokens)  tell the Llama its context holds `tokens` (after state_set)
    lora_init / set_loras / lora_free          GGUF LoRA adapters on the model and context
    render_template(formatter, messages, ...)  a chat template without the generation prompt
    model_params(repack=...)     load with llama.cpp's use_extra_bufts (weight repacking) switched
    ggml_type(name)              "q8_0" -> GGML_TYPE_Q8_0 (KV-cache types)
    log_callback(on_text)        llama.cpp's log text to `on_text` while a block runs, then the binding's own
                                 callback (llama_cpp._logger) back
    version()                    llama_cpp.__version__
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import threading
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType
from typing import Any

from care.errors import InvalidModelError, require

SUPPORTED = ">=0.3.36,<0.4"  # the pin in pyproject.toml (see the module docstring)


def load() -> ModuleType:
    """`llama_cpp`, with the CPU module checked for this machine (a one-line error if none runs here)."""
    require("llama_cpp", "runtime")
    from care.runtime import cpu_guard

    cpu_guard.ensure()
    return importlib.import_module("llama_cpp")


def submodule(name: str) -> ModuleType:
    """A llama_cpp submodule (e.g. "llama_chat_format", "llama_grammar", "llama_cpp") behind the same guard."""
    load()
    return importlib.import_module(f"llama_cpp.{name}")


def version() -> str:
    return str(load().__version__)


# -- handles ----------------------------------------------------------------------------------------------
def model_handle(llm: Any) -> Any:
    return llm._model.model  # noqa: SLF001


def ctx_handle(llm: Any) -> Any:
    """The llama_context*, or None when the Llama has none (closed, or never loaded)."""
    return getattr(getattr(llm, "_ctx", None), "ctx", None)


def vocab(llm: Any) -> Any:
    return llm._model.vocab  # noqa: SLF001


# -- vocabulary and model facts ---------------------------------------------------------------------------
def token_eot(llm: Any) -> int:
    eot = getattr(llm._model, "token_eot", lambda: -1)()  # noqa: SLF001
    return -1 if eot is None else int(eot)


def n_ctx_train(llm: Any) -> int:
    return int(getattr(llm._model, "n_ctx_train", lambda: 0)() or 0)  # noqa: SLF001


def is_eog(llm: Any, token: int) -> bool:
    return bool(load().llama_vocab_is_eog(vocab(llm), int(token)))


def logits_ith(llm: Any, i: int = -1) -> Any:
    """The logits of the i-th token of the last evaluated batch (-1: its last token) as a numpy float32 view of
    llama.cpp's buffer (n_vocab long): valid until the next eval."""
    import numpy as np

    ptr = load().llama_get_logits_ith(ctx_handle(llm), int(i))
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))


# -- KV state ---------------------------------------------------------------------------------------------
def clear_kv(llm: Any) -> None:
    llm._ctx.kv_cache_seq_rm(-1, 0, -1)  # noqa: SLF001 - the binding's own context wrapper


def state_get(llm: Any, seq: int = 0) -> bytes:
    """Sequence `seq`'s KV state (llama_state_seq_get_data)."""
    lib = load()
    ctx = ctx_handle(llm)
    size = lib.llama_state_seq_get_size(ctx, seq)
    buf = (ctypes.c_uint8 * size)()
    n = lib.llama_state_seq_get_data(ctx, buf, size, seq)
    return bytes(buf)[:n]


def state_set(llm: Any, payload: bytes, seq: int = 0) -> bool:
    """Load a KV state saved by state_get into sequence `seq`; False when llama.cpp refuses it (the KV cache is
    then cleared)."""
    buf = (ctypes.c_uint8 * len(payload)).from_buffer_copy(payload)
    if load().llama_state_seq_set_data(ctx_handle(llm), buf, len(payload), seq) == 0:
        clear_kv(llm)
        return False
    return True


def mark_evaluated(llm: Any, tokens: Sequence[int]) -> None:
    """The context now holds `tokens` (loaded, not decoded here): the Llama reuses them as a prefix, and
    decodes the next prompt token, since no logits are live."""
    llm.input_ids[:len(tokens)] = list(tokens)
    llm.n_tokens = len(tokens)
    llm._requires_eval = True  # noqa: SLF001


# -- LoRA adapters ----------------------------------------------------------------------------------------
def lora_init(llm: Any, path: str) -> Any:
    """A llama_adapter_lora* for the GGUF adapter at `path` on this model (falsy when llama.cpp refuses it)."""
    return load().llama_adapter_lora_init(model_handle(llm), str(path).encode("utf-8"))


def set_loras(llm: Any, handles: Sequence[Any], scales: Sequence[float]) -> bool:
    """Make exactly these adapters active on the context (none: the base alone); False when llama.cpp refuses.
    Does nothing (True) when the context is gone."""
    lib = load()
    ctx = ctx_handle(llm)
    if ctx is None:
        return True
    n = len(handles)
    arr = (lib.llama_adapter_lora_p_ctypes * n)(*handles) if n else None
    sc = (ctypes.c_float * n)(*[float(s) for s in scales]) if n else None
    return lib.llama_set_adapters_lora(ctx, arr, n, sc) == 0


def lora_free(handle: Any) -> None:
    load().llama_adapter_lora_free(handle)


# -- chat template and load parameters --------------------------------------------------------------------
def render_template(formatter: Any, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool,
                    raise_exception: Callable[[str], None]) -> str:
    """Render with a Jinja2ChatFormatter's own sandboxed environment; unlike calling the formatter, this can
    leave the generation prompt out."""
    if add_generation_prompt:
        return formatter(messages=list(messages)).prompt
    return formatter._environment.render(  # noqa: SLF001 - same sandboxed env, one flag different
        messages=list(messages), eos_token=formatter.eos_token, bos_token=formatter.bos_token,
        add_generation_prompt=False, raise_exception=raise_exception)


_PARAMS_LOCK = threading.Lock()


@contextlib.contextmanager
def model_params(repack: bool | None) -> Iterator[None]:
    """Load with llama.cpp's `use_extra_bufts` (weight repacking) switched as asked.

    llama-cpp-python does not expose that model parameter, so wrap the defaults it starts from while
    the model loads (under a lock: the wrap is process-wide)."""
    if repack is None:
        yield
        return
    lib = submodule("llama_cpp")

    with _PARAMS_LOCK:
        original = lib.llama_model_default_params

        def patched():
            params = original()
            params.use_extra_bufts = bool(repack)
            return params

        lib.llama_model_default_params = patched
        try:
            yield
        finally:
            lib.llama_model_default_params = original


def ggml_type(name: str) -> int:
    """llama.cpp's number for a KV-cache type name ("f16", "q8_0", "q4_0")."""
    lib = load()
    attr = f"GGML_TYPE_{name.upper()}"
    if not hasattr(lib, attr):
        raise InvalidModelError(f"Unknown KV-cache type '{name}'", hint="Use one of f16, q8_0, q4_0")
    return int(getattr(lib, attr))


@contextlib.contextmanager
def log_callback(on_text: Callable[[str], None]) -> Iterator[None]:
    """Hand llama.cpp's log text (each call's text, usually one line with its newline) to `on_text` while the
    block runs; the binding's own callback (llama_cpp._logger, which honours verbose=) is set back after it.
    The callback is process-wide: one block at a time."""
    lib = load()
    restore = importlib.import_module("llama_cpp._logger").llama_log_callback

    @lib.llama_log_callback
    def callback(level: int, text: bytes, user_data: Any) -> None:  # noqa: ARG001 - the C signature
        on_text(text.decode("utf-8", "replace"))

    lib.llama_log_set(callback, ctypes.c_void_p(0))
    try:
        yield
    finally:
        lib.llama_log_set(restore, ctypes.c_void_p(0))
