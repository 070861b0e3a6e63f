"""An OpenAI-compatible chat server over one ChatEngine (Starlette): /v1/chat/completions, /v1/models.

Each request carries the whole conversation (as OpenAI clients send it); it runs through a ChatSession,
so red-flag notices come first in the reply (also listed in the non-standard `care_safety` field), medical
answers carry the not-a-diagnosis line, and over-long histories are trimmed. One generation at a time:
the engine's lock queues concurrent requests (one model, one CPU).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, replace
from typing import Any

from care.errors import CareError, UsageError
from care.runtime.engine import ChatEngine, GenerationResponse, SamplingConfig
from care.runtime.session import ChatSession, ContextNote, SafetyNotice

log = logging.getLogger(__name__)

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def check_bind(host: str, api_key: str | None) -> None:
    """Refuse to listen beyond loopback without an API key."""
    if _is_loopback(host) or api_key:
        return
    raise UsageError(
        f"Refusing to serve on {host} without an API key: anyone on the network could use the model",
        hint="Pass --api-key KEY (or set CARE_API_KEY); clients send 'Authorization: Bearer KEY'",
    )


def _is_loopback(host: str) -> bool:
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def notice_text(notice: SafetyNotice) -> str:
    return f"[SAFETY {notice.category}] {notice.message}\n\n"


def create_app(engine: ChatEngine, *, domain: str = "auto", api_key: str | None = None,
               languages: tuple[str, ...] | None = None, model_id: str | None = None):
    from starlette.applications import Starlette
    from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    model_name = model_id or getattr(engine, "path", None) and engine.path.stem or engine.model_name
    created = int(time.time())

    def error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status)

    def authorized(request: Request) -> bool:
        if not api_key:
            return True
        got = request.headers.get("authorization", "")
        return hmac.compare_digest(got.encode(), f"Bearer {api_key}".encode())

    async def models(request: Request) -> JSONResponse:
        if not authorized(request):
            return error(401, "Missing or wrong API key (send 'Authorization: Bearer KEY')", "authentication_error")
        return JSONResponse({"object": "list", "data": [
            {"id": model_name, "object": "model", "created": created, "owned_by": "care",
             "n_ctx": engine.n_ctx, "quant": engine.quant_type}]})

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "model": model_name})

    async def completions(request: Request):
        if not authorized(request):
            return error(401, "Missing or wrong API key (send 'Authorization: Bearer KEY')", "authentication_error")
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return error(400, "The request body is not JSON")
        try:
            session, text, sampling = _prepare(engine, body, domain, languages)
        except (CareError, ValueError, TypeError, KeyError) as exc:
            return error(400, exc.one_line() if isinstance(exc, CareError) else f"Bad request: {exc}")
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if body.get("stream"):
            events = session.send(text)
            # Fail before the 200 header when the message cannot fit (GenerationError from fit()).
            try:
                first = await run_in_threadpool(_next_or_none, events)
            except CareError as exc:
                return error(400, exc.one_line())
            return StreamingResponse(_sse(session, first, events, rid, model_name, iterate_in_threadpool),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            result = await run_in_threadpool(_collect, session, text)
        except CareError as exc:
            return error(400, exc.one_line())
        notices, content, last = result
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": _finish(last)}],
            "usage": _usage(last),
            "care_safety": [asdict(n) for n in notices],
            "care_domain": session.domain,
        })

    return Starlette(routes=[
        Route("/v1/chat/completions", completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ])


def _prepare(engine: ChatEngine, body: dict[str, Any], domain: str,
             languages: tuple[str, ...] | None) -> tuple[ChatSession, str, SamplingConfig]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise UsageError("`messages` must be a non-empty list")
    if messages[-1].get("role") != "user" or not str(messages[-1].get("content") or "").strip():
        raise UsageError("The last message must be a non-empty user message")
    base = engine.config.sampling
    sampling = replace(
        base,
        temperature=float(body.get("temperature", base.temperature)),
        top_p=float(body.get("top_p", base.top_p)),
        top_k=int(body.get("top_k", base.top_k)),
        repeat_penalty=float(body.get("repeat_penalty", base.repeat_penalty)),
        seed=body.get("seed", base.seed),
        max_tokens=int(body.get("max_tokens") or body.get("max_completion_tokens") or base.max_tokens),
        stop=_stops(body.get("stop")),
    )
    if sampling.max_tokens < 1:
        raise UsageError("max_tokens must be at least 1")
    session = ChatSession(engine, domain=domain, languages=languages, sampling=sampling)
    history = [{"role": m["role"], "content": _content(m.get("content"))} for m in messages[:-1]]
    if history:
        session.load_messages(history)
    return session, _content(messages[-1]["content"]), sampling


def _stops(value: Any) -> tuple[str, ...]:
    if not value:
        return ()
    return (str(value),) if isinstance(value, str) else tuple(str(v) for v in value)


def _content(content: Any) -> str:
    """OpenAI content is a string or a list of parts; only text parts are supported."""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return "" if content is None else str(content)


def _next_or_none(it: Iterator[Any]) -> Any:
    return next(it, None)


def _collect(session: ChatSession, text: str) -> tuple[list[SafetyNotice], str, GenerationResponse | None]:
    notices: list[SafetyNotice] = []
    parts: list[str] = []
    last = None
    for event in session.send(text):
        if isinstance(event, SafetyNotice):
            notices.append(event)
            parts.append(notice_text(event))
        elif isinstance(event, ContextNote):
            log.info("%s", event.message)
        elif event.finish_reason is None:
            parts.append(event.text)
        else:
            last = event
    return notices, "".join(parts), last


def _finish(last: GenerationResponse | None) -> str:
    reason = last.finish_reason if last else "stop"
    return "length" if reason == "length" else "stop"


def _usage(last: GenerationResponse | None) -> dict[str, int]:
    p = last.prompt_tokens if last else 0
    c = last.completion_tokens if last else 0
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


async def _sse(session: ChatSession, first: Any, events: Iterator[Any], rid: str, model: str,
               iterate_in_threadpool) -> AsyncIterator[str]:
    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        obj = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def all_events() -> Iterator[Any]:
        if first is not None:
            yield first
        yield from events

    yield chunk({"role": "assistant", "content": ""})
    finished = False
    try:
        async for event in iterate_in_threadpool(all_events()):
            if isinstance(event, SafetyNotice):
                yield chunk({"content": notice_text(event)}, care_safety=asdict(event))
            elif isinstance(event, ContextNote):
                continue
            elif event.finish_reason is None:
                if event.text:
                    yield chunk({"content": event.text})
            else:
                yield chunk({}, _finish(event), usage=_usage(event))
                finished = True
        yield "data: [DONE]\n\n"
    finally:
        if not finished:  # the client went away: stop generating and free the engine
            session.cancel()
        try:
            events.close()
        except ValueError:  # still running in the worker thread; it ends at the next token (cancelled)
            pass
