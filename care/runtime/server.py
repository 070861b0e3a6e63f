"""An OpenAI-compatible chat server over one chat engine (Starlette): /v1/chat/completions, /v1/models, and at /
the web chat for phones and tablets on the clinic's network (care/runtime/web: static files, no CDN).

Each request carries the whole conversation (as OpenAI clients send it); it runs through a ChatSession,
so a flagged turn answers with the emergency notice (also in the non-standard `care_safety` field) and the
first-aid card (`care_card`), and by default nothing else: `care_emergency_reply: "model"` per request, or
`care serve --emergency-reply model`, adds the model's own reply after them, labelled and checked (a JSON-mode
request always gets the model's JSON, with the notice and card in those fields only). Medical
answers carry the not-a-diagnosis line, and over-long histories are trimmed. One generation at a time:
the engine's lock queues concurrent requests (one model, one CPU).

Bad input never reaches the model: every malformed request gets a 400 that names the field (care.runtime.
requests), an over-large body a 413, and OpenAI features this server does not have (n > 1, tools, images,
logprobs, ...) a 400 that names them instead of being silently ignored.
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
from care.runtime.backend import ChatBackend, GenerationResponse, SamplingConfig
from care.runtime.requests import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_MESSAGES, ChatRequest, parse_request
from care.runtime.session import AnywayNote, ChatSession, ContextNote, FirstAidCard, SafetyNotice

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


def lan_addresses() -> list[str]:
    """This machine's IPv4 addresses other than loopback (where phones on the same Wi-Fi reach it)."""
    try:
        import psutil
    except ImportError:
        return []
    import socket

    found = []
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not a.address.startswith("127.") and not a.address.startswith("169.254."):
                found.append(a.address)
    return sorted(set(found))


def notice_text(notice: SafetyNotice) -> str:
    return f"[SAFETY {notice.category}] {notice.message}\n\n"


def card_text(card: FirstAidCard) -> str:
    return card.text


def anyway_text(note: AnywayNote) -> str:
    return "\n\n" + note.text


def create_app(engine: ChatBackend, *, domain: str = "auto", api_key: str | None = None,
               languages: tuple[str, ...] | None = None, model_id: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_messages: int = DEFAULT_MAX_MESSAGES,
               emergency_reply: str = "card"):
    from starlette.applications import Starlette
    from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    from care.runtime import triage

    triage.load_rules()  # here, not in the first request: building the rules takes ~3 s on 2 cores
    model_name = model_id or getattr(engine, "path", None) and engine.path.stem or engine.model_name
    adapter_names: tuple[str, ...] = tuple(getattr(engine, "adapter_names", ()))
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
        base = {"object": "model", "created": created, "owned_by": "care", "n_ctx": engine.n_ctx,
                "quant": engine.quant_type}
        # One id per LoRA adapter (care serve --adapters): a client picks one with `model`, or with
        # llama-server's per-request `lora` ids (the `lora_id` here).
        return JSONResponse({"object": "list", "data": [{"id": model_name, **base}] + [
            {"id": name, **base, "adapter": name, "lora_id": i, "base_model": model_name}
            for i, name in enumerate(adapter_names)]})

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "model": model_name})

    async def completions(request: Request):
        if not authorized(request):
            return error(401, "Missing or wrong API key (send 'Authorization: Bearer KEY')", "authentication_error")
        too_big = f"The request body is over the {max_body_bytes}-byte limit (care serve --max-body-bytes)"
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body_bytes:
            return error(413, too_big)
        raw = b""
        async for part in request.stream():  # counted as it arrives: a missing/false length cannot get past
            raw += part
            if len(raw) > max_body_bytes:
                return error(413, too_big)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return error(400, "The request body is not JSON")
        try:
            req = parse_request(body, engine.config.sampling, max_messages=max_messages)
            req.sampling = _pick_adapters(req, adapter_names, model_name)
            session = _session(engine, req, req.domain or domain, languages, emergency_reply)
        except CareError as exc:
            return error(_status(exc), exc.one_line(), _kind(exc))
        text = req.text
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if req.stream:
            events = session.send(text, req.emergency_reply)
            # Fail before the 200 header when the message cannot fit (GenerationError from fit()) or an
            # upstream engine fails (502/504) on an unflagged turn. A safety notice is never held back: it goes
            # out at once, and an engine failure after it becomes an SSE error event.
            try:
                first = await run_in_threadpool(_head, events)
            except CareError as exc:
                return error(_status(exc), exc.one_line(), _kind(exc))
            return StreamingResponse(_sse(session, first, events, rid, model_name, iterate_in_threadpool),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            # A JSON client needs its JSON: on a flagged turn the model still writes it (instructed and checked),
            # and the notice and card travel in care_safety / care_card.
            reply_mode = "model" if req.json_mode and req.emergency_reply is None else req.emergency_reply
            result = await run_in_threadpool(_collect, session, text, req.json_mode, reply_mode)
        except CareError as exc:
            # A flagged turn whose engine failed still tells the user where to get help, in the error itself.
            flagged = list(getattr(exc, "care_notices", ()))
            body = error(_status(exc), exc.one_line(), _kind(exc))
            if flagged:
                data = json.loads(body.body)
                data["error"]["message"] = " ".join(notice_text(n) for n in flagged) + " " + data["error"]["message"]
                data["care_safety"] = [asdict(n) for n in flagged]
                return JSONResponse(data, status_code=body.status_code)
            return body
        notices, cards, content, last = result
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": _finish(last)}],
            "usage": _usage(last),
            "care_safety": [asdict(n) for n in notices],
            "care_card": [asdict(c) for c in cards],
            "care_domain": session.domain,
        })

    async def page(request: Request):
        name = request.path_params.get("name", "index.html")
        return _static(name)

    return Starlette(routes=[
        Route("/v1/chat/completions", completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/", page, methods=["GET"]),
        Route("/{name:str}", page, methods=["GET"]),  # last: the web chat's own files
    ])


WEB_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
             "app.css": "text/css; charset=utf-8"}
_WEB_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache",
}


def _static(name: str):
    """One file of the web chat (no key needed: it holds no data; every API call it makes does)."""
    from importlib import resources

    from starlette.responses import JSONResponse, Response

    if name not in WEB_FILES:
        return JSONResponse({"error": {"message": f"No page {name!r} here: the chat is at /", "type": "not_found"}},
                            status_code=404)
    body = (resources.files("care") / "runtime" / "web" / name).read_bytes()
    return Response(body, media_type=WEB_FILES[name], headers=_WEB_HEADERS)


def _pick_adapters(req: ChatRequest, names: tuple[str, ...], model_name: str) -> SamplingConfig:
    """The request's adapters: `lora` ids, else a `model` naming an adapter (the base id: none), else None
    (the session uses the adapter of its domain). Another `model` value is ignored, as before adapters."""
    if req.lora is not None:
        for i, (idx, _) in enumerate(req.lora):
            if not 0 <= idx < len(names):
                raise UsageError(f"`lora[{i}].id` {idx} is not a loaded adapter",
                                 hint=f"ids 0..{len(names) - 1} (GET /v1/models)" if names
                                 else "This server was started without --adapters")
        return replace(req.sampling, adapters=tuple((names[idx], scale) for idx, scale in req.lora))
    if names and req.model == model_name:
        return replace(req.sampling, adapters=())
    if req.model in names:
        return replace(req.sampling, adapters=((req.model, 1.0),))
    return req.sampling


def _status(exc: CareError) -> int:
    """400 for a bad request; an upstream engine's failure carries its own (502 bad gateway, 504 timeout)."""
    return int(getattr(exc, "status", 400))


def _kind(exc: CareError) -> str:
    return "upstream_error" if _status(exc) >= 500 else "invalid_request_error"


def _session(engine: ChatBackend, req: ChatRequest, domain: str,
             languages: tuple[str, ...] | None, emergency_reply: str = "card") -> ChatSession:
    # An upstream backend serves requests concurrently: each gets a view with its own cancel.
    per_request = getattr(engine, "per_request", None)
    if per_request is not None:
        engine = per_request()
    session = ChatSession(engine, domain=domain, languages=languages, sampling=req.sampling,
                          emergency_reply=emergency_reply)
    if req.history:
        session.load_messages(req.history)
    return session


def _head(it: Iterator[Any]) -> list[Any]:
    """Up to the first safety notice (sent at once, whatever the engine does next), else the first reply event
    (or the end), in order."""
    head: list[Any] = []
    for event in it:
        head.append(event)
        if not isinstance(event, ContextNote):
            break
    return head


def _collect(session: ChatSession, text: str, json_mode: bool = False, emergency_reply: str | None = None
             ) -> tuple[list[SafetyNotice], list[FirstAidCard], str, GenerationResponse | None]:
    """The whole reply. In JSON mode the content is the model's JSON alone: notices and cards stay in
    `care_safety` / `care_card` and the framing lines (disclaimer) are left out, so a client can parse it."""
    notices: list[SafetyNotice] = []
    cards: list[FirstAidCard] = []
    parts: list[str] = []
    last = None
    try:
        for event in session.send(text, emergency_reply):
            if isinstance(event, SafetyNotice):
                notices.append(event)
                if not json_mode:
                    parts.append(notice_text(event))
            elif isinstance(event, FirstAidCard):
                cards.append(event)
                if not json_mode:
                    parts.append(card_text(event))
            elif isinstance(event, AnywayNote):
                if not json_mode:
                    parts.append(anyway_text(event))
            elif isinstance(event, ContextNote):
                log.info("%s", event.message)
            elif event.finish_reason is None:
                parts.append(event.text)
            else:
                last = event
    except CareError as exc:  # the engine failed after the notices: the error carries them (see create_app)
        exc.care_notices = tuple(notices)  # type: ignore[attr-defined]
        raise
    content = "".join(parts)
    if json_mode:
        from care.runtime.triage import framing

        for key in ("disclaimer", "not_a_doctor"):
            tail = framing(session.rules, key, session.languages)
            if tail:
                content = content.replace("\n\n" + tail, "")
    return notices, cards, content, last


def _finish(last: GenerationResponse | None) -> str:
    reason = last.finish_reason if last else "stop"
    return "length" if reason == "length" else "stop"


def _usage(last: GenerationResponse | None) -> dict[str, int]:
    p = last.prompt_tokens if last else 0
    c = last.completion_tokens if last else 0
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


async def _sse(session: ChatSession, first: list[Any], events: Iterator[Any], rid: str, model: str,
               iterate_in_threadpool) -> AsyncIterator[str]:
    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        obj = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def all_events() -> Iterator[Any]:
        yield from first
        yield from events

    yield chunk({"role": "assistant", "content": ""})
    finished = False
    try:
        async for event in iterate_in_threadpool(all_events()):
            if isinstance(event, SafetyNotice):
                yield chunk({"content": notice_text(event)}, care_safety=asdict(event))
            elif isinstance(event, FirstAidCard):
                yield chunk({"content": card_text(event)}, care_card=asdict(event))
            elif isinstance(event, AnywayNote):
                yield chunk({"content": anyway_text(event)}, care_unvetted=True)
            elif isinstance(event, ContextNote):
                continue
            elif event.finish_reason is None:
                if event.text:
                    yield chunk({"content": event.text})
            else:
                yield chunk({}, _finish(event), usage=_usage(event))
                finished = True
    except CareError as exc:  # e.g. the upstream engine failed mid-reply: after the 200, an SSE error event
        log.warning("stream failed: %s", exc.one_line())
        yield f"data: {json.dumps({'error': {'message': exc.one_line(), 'type': _kind(exc), 'code': _status(exc)}})}\n\n"
        finished = True
    else:
        yield "data: [DONE]\n\n"
    finally:
        if not finished:  # the client went away: stop generating and free the engine
            session.cancel()
        try:
            events.close()
        except ValueError:  # still running in the worker thread; it ends at the next token (cancelled)
            pass
