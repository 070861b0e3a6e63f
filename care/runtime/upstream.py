"""A chat backend that forwards generation to an OpenAI-compatible engine (llama-server, vLLM, Ollama).

`care serve --upstream URL` wraps this in the same ChatSession and server as a local model, so the CARE
layer is one code path: safety notices first, the domain system prompt, the medical framing, context
fitting and the API key all happen here; only the tokens come from the upstream engine, which serves many
users at once (llama-server `-np N` slots with continuous batching, vLLM, ...).

Context fitting needs token counts. llama-server has `/tokenize` and `/apply-template`, so its counts are
exact. Other engines (vLLM, Ollama) are counted by an upper bound: one token per UTF-8 byte plus one, plus 8
tokens of template per message. Byte-level BPE and SentencePiece with byte fallback never produce more tokens
than bytes, so a fitted prompt never overflows the engine's context; the price is that long histories are
trimmed earlier (English averages ~4 bytes per token). A smaller ratio was tried and failed: SmolLM2 spends
11 tokens on the 20 bytes of "Ça va mieux, merci." (tests/test_upstream.py).

Every upstream failure is an `UpstreamError` carrying the HTTP status the server should answer with: 502
(refused, 5xx, malformed JSON, not an SSE stream) or 504 (timed out). Connect and read timeouts bound every
call, so a hung engine becomes a 504 instead of a hung client.
"""

from __future__ import annotations

import copy
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from care.errors import GenerationError
from care.runtime.backend import ContextBudget, EngineConfig, GenerationResponse, Message, SamplingConfig

log = logging.getLogger(__name__)

DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_READ_TIMEOUT_S = 120.0  # longest silence between two tokens (or before the first) we wait for
BYTES_PER_TOKEN = 1  # the upper bound for engines without /tokenize (see the module docstring)
TEMPLATE_TOKENS_PER_MESSAGE = 8


class UpstreamError(GenerationError):
    """The upstream engine failed; `status` is what the gateway answers (502 bad gateway, 504 timeout)."""

    def __init__(self, message: str, *, status: int = 502, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.status = status


class UpstreamBackend(ContextBudget):
    """ChatBackend over an OpenAI-compatible HTTP engine. `per_request()` gives each request its own cancel."""

    backend_name = "upstream"

    def __init__(self, url: str, *, api_key: str | None = None, model: str | None = None,
                 config: EngineConfig | None = None, n_ctx: int | None = None,
                 connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
                 read_timeout_s: float = DEFAULT_READ_TIMEOUT_S) -> None:
        import httpx

        self.base = url.rstrip("/")
        if self.base.endswith("/v1"):
            self.base = self.base[: -len("/v1")]
        self.config = config or EngineConfig()
        self.load_s = 0.0
        self._timeout = httpx.Timeout(connect=connect_timeout_s, read=read_timeout_s, write=read_timeout_s,
                                      pool=connect_timeout_s)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # One pooled client shared by all requests (httpx.Client is thread-safe); enough connections for
        # every concurrent request the server's thread pool can run.
        self._client = httpx.Client(timeout=self._timeout, headers=headers,
                                    limits=httpx.Limits(max_connections=64, max_keepalive_connections=32))
        # ContextBudget's token-count cache, made here so that per_request() views share it.
        self._token_counts: OrderedDict[str, int] = OrderedDict()
        self._token_counts_lock = threading.Lock()
        self._cancel = threading.Event()
        self._response: Any = None
        self._owner = True
        started = time.monotonic()
        self.llama_server = False
        props = self._probe_props()
        if props is not None:
            self.llama_server = True
        models = self._get_json("/v1/models")
        ids = [m.get("id") for m in models.get("data", []) if isinstance(m, dict)] if isinstance(models, dict) else []
        self._model = model or (ids[0] if ids and isinstance(ids[0], str) else "upstream")
        slot_ctx = (props or {}).get("default_generation_settings", {}).get("n_ctx") if props else None
        self._n_ctx = int(n_ctx or slot_ctx or self.config.n_ctx)
        if slot_ctx and n_ctx and n_ctx > slot_ctx:
            log.warning("--n-ctx %d is over the upstream slot's %d tokens; using %d", n_ctx, slot_ctx, slot_ctx)
            self._n_ctx = int(slot_ctx)
        self.path = Path(self._model)
        self.load_s = time.monotonic() - started
        log.info("upstream %s: model %s, n_ctx %d, tokenizer %s", self.base, self._model, self._n_ctx,
                 "exact (/tokenize)" if self.llama_server else f"estimated ({BYTES_PER_TOKEN} bytes/token)")

    # -- facts -------------------------------------------------------------------------------------------
    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    @property
    def model_name(self) -> str:
        return self._model

    @property
    def quant_type(self) -> str:
        return "upstream"

    # -- HTTP helpers ------------------------------------------------------------------------------------
    def _fail(self, exc: Exception, what: str) -> UpstreamError:
        import httpx

        if isinstance(exc, httpx.TimeoutException):
            return UpstreamError(f"The upstream engine at {self.base} did not answer {what} in time "
                                 f"({type(exc).__name__})", status=504,
                                 hint="Check the engine is running and not overloaded, or raise --upstream-timeout")
        return UpstreamError(f"Cannot reach the upstream engine at {self.base} ({what}): {exc or type(exc).__name__}",
                             hint="Check --upstream (host, port) and that the engine is running")

    def _get_json(self, path: str) -> Any:
        return self._json("GET", path)

    def _post_json(self, path: str, body: dict[str, Any]) -> Any:
        return self._json("POST", path, body)

    def _json(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        import httpx

        try:
            response = (self._client.get(self.base + path) if body is None
                        else self._client.post(self.base + path, json=body))
        except httpx.HTTPError as exc:
            raise self._fail(exc, f"{method} {path}") from exc
        self._check_status(response, path)
        try:
            return response.json()
        except ValueError as exc:
            raise UpstreamError(f"The upstream engine answered {method} {path} with malformed JSON",
                                hint="Is --upstream an OpenAI-compatible engine?") from exc

    def _probe_props(self) -> dict[str, Any] | None:
        """llama-server's /props (slot context size); None for engines without it."""
        import httpx

        try:
            response = self._client.get(self.base + "/props")
            data = response.json() if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None
        return data if isinstance(data, dict) and "default_generation_settings" in data else None

    def _check_status(self, response: Any, what: str) -> None:
        if response.status_code < 400:
            return
        try:
            response.read()
            body = response.json()
            detail = body.get("error", body) if isinstance(body, dict) else body
            if isinstance(detail, dict):
                detail = detail.get("message", detail)
        except Exception:  # noqa: BLE001 - any body at all: we only want a readable snippet
            detail = response.text[:200] if hasattr(response, "text") else ""
        code = response.status_code
        if code in (401, 403):
            raise UpstreamError(f"The upstream engine refused the key ({code}) on {what}: {detail}",
                                hint="Pass the engine's key with --upstream-key")
        if code == 504:
            raise UpstreamError(f"The upstream engine timed out on {what}: {detail}", status=504)
        if code >= 500:
            raise UpstreamError(f"The upstream engine failed on {what} (HTTP {code}): {detail}")
        # 4xx: the request was wrong for this engine (e.g. over its context): still a gateway failure.
        raise UpstreamError(f"The upstream engine rejected {what} (HTTP {code}): {detail}")

    # -- tokens ------------------------------------------------------------------------------------------
    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        if self.llama_server:
            try:
                data = self._post_json("/apply-template", {"messages": list(messages)})
                if isinstance(data, dict) and isinstance(data.get("prompt"), str):
                    return data["prompt"]
            except UpstreamError:
                pass  # older llama-server: fall back to the estimate below
        return "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + ("<|assistant|>\n" if
                                                                                   add_generation_prompt else "")

    def tokenize(self, text: str) -> list[int]:
        if self.llama_server:
            data = self._post_json("/tokenize", {"content": text, "add_special": True})
            tokens = data.get("tokens") if isinstance(data, dict) else None
            if isinstance(tokens, list):
                return [int(t) if isinstance(t, int) else 0 for t in tokens]
        # The estimate: ids are placeholders, only the count is used (fit, context_used).
        n = -(-len(text.encode("utf-8")) // BYTES_PER_TOKEN) + 1 + text.count("<|") * TEMPLATE_TOKENS_PER_MESSAGE
        return [0] * n

    def detokenize(self, ids: Sequence[int]) -> str:
        if not self.llama_server:
            raise GenerationError("This upstream engine has no /detokenize endpoint")
        data = self._post_json("/detokenize", {"tokens": list(ids)})
        return str(data.get("content", "")) if isinstance(data, dict) else ""

    # -- generation --------------------------------------------------------------------------------------
    def per_request(self) -> UpstreamBackend:
        """A view for one request: the same client and caches, its own cancel (requests run concurrently)."""
        view = copy.copy(self)
        view._owner = False
        view._cancel = threading.Event()
        view._response = None
        return view

    def cancel(self) -> None:
        """Stop this request's stream now (from any thread): closing the response drops the upstream
        connection, which llama-server and vLLM take as 'client gone' and stop generating."""
        self._cancel.set()
        response = self._response
        if response is not None:
            try:
                response.close()
            except Exception:  # noqa: BLE001 - closing from another thread may race the reader; it stops either way
                pass

    def _payload(self, messages: Sequence[Message], s: SamplingConfig) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self._model, "messages": list(messages), "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": s.temperature, "top_p": s.top_p, "max_tokens": s.max_tokens,
        }
        if s.seed is not None:
            body["seed"] = s.seed
        if s.stop:
            body["stop"] = list(s.stop)
        if s.json_schema is not None:
            body["response_format"] = ({"type": "json_object"} if not s.json_schema else
                                       {"type": "json_schema", "json_schema": {"name": "reply", "schema": s.json_schema}})
        if self.llama_server:  # llama.cpp's own sampling names; other engines may reject unknown fields
            body["top_k"] = s.top_k
            body["repeat_penalty"] = s.repeat_penalty
        return body

    def stream(self, messages: Sequence[Message],
               sampling: SamplingConfig | None = None) -> Iterator[GenerationResponse]:
        import httpx

        s = sampling or self.config.sampling
        started = time.monotonic()
        ttft: float | None = None
        n_chunks = 0
        usage: dict[str, Any] = {}
        finish: str | None = None
        self._cancel.clear()
        try:
            with self._client.stream("POST", self.base + "/v1/chat/completions",
                                     json=self._payload(messages, s)) as response:
                self._response = response
                self._check_status(response, "POST /v1/chat/completions")
                kind = response.headers.get("content-type", "")
                if "text/event-stream" not in kind:
                    raise UpstreamError(f"The upstream engine answered a streaming request with "
                                        f"'{kind or 'no content type'}', not an SSE stream",
                                        hint="Is --upstream an OpenAI-compatible engine (…/v1)?")
                for line in response.iter_lines():
                    if self._cancel.is_set():
                        break
                    if not line.startswith("data:"):
                        continue  # SSE comments, event names, keep-alives
                    data = line[5:].strip()
                    if data == "[DONE]":
                        finish = finish or "stop"
                        break
                    try:
                        obj = json.loads(data)
                    except json.JSONDecodeError as exc:
                        raise UpstreamError(f"The upstream engine sent malformed JSON in its stream: {data[:80]!r}") \
                            from exc
                    if not isinstance(obj, dict):
                        raise UpstreamError(f"The upstream engine sent a stream event that is not an object: "
                                            f"{data[:80]!r}")
                    if "error" in obj:
                        err = obj["error"]
                        msg = err.get("message", err) if isinstance(err, dict) else err
                        raise UpstreamError(f"The upstream engine failed mid-stream: {msg}")
                    if isinstance(obj.get("usage"), dict):
                        usage = obj["usage"]
                    for choice in obj.get("choices") or []:
                        delta = (choice or {}).get("delta") or {}
                        text = delta.get("content")
                        if isinstance(text, str) and text:
                            if ttft is None:
                                ttft = time.monotonic() - started
                            n_chunks += 1
                            yield GenerationResponse(text=text)
                        if choice.get("finish_reason"):
                            finish = choice["finish_reason"]
                if finish is None and not self._cancel.is_set():
                    # The stream ended without [DONE] or a finish reason: the engine dropped the connection.
                    raise UpstreamError("The upstream engine closed the stream before the reply finished")
        except (httpx.HTTPError, httpx.StreamError) as exc:  # StreamClosed: cancel() closed it under the reader
            if not self._cancel.is_set():
                raise self._fail(exc, "the chat request") from exc
        finally:
            self._response = None
        elapsed = time.monotonic() - started
        completion = int(usage.get("completion_tokens") or n_chunks)
        yield GenerationResponse(
            text="", finish_reason="cancelled" if self._cancel.is_set() else ("length" if finish == "length" else "stop"),
            prompt_tokens=int(usage.get("prompt_tokens") or 0), completion_tokens=completion, ttft_s=ttft,
            tokens_per_s=completion / elapsed if elapsed > 0 else 0.0, elapsed_s=elapsed)

    def close(self) -> None:
        if self._owner:  # a per-request view must not close the client the other requests share
            self._client.close()
