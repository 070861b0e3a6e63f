"""`care serve --upstream`: the CARE layer in front of an OpenAI-compatible engine.

A fake engine (a small Starlette app on 127.0.0.1, in a thread) stands in for llama-server/vLLM; the last user
message picks its behaviour (`MODE:500`, `MODE:hang`, ...), so one module-scoped pair of servers covers every
failure. The gateway is the real `create_app` over the real `UpstreamBackend`, on a real port, driven by httpx.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from care.runtime.server import create_app
from care.runtime.upstream import UpstreamBackend, UpstreamError

FLAGGED = "My father has crushing chest pain and is sweating"
READ_TIMEOUT_S = 1.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(app) -> tuple[str, object, threading.Thread]:
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    assert server.started, "uvicorn did not start"
    return f"http://127.0.0.1:{port}", server, thread


class FakeEngine:
    """An OpenAI-compatible engine that records what it was asked and misbehaves on request."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.closed_streams = threading.Event()  # a streaming response was torn down (client gone)
        self.active = 0  # streams open now, and the most open at once
        self.most_active = 0

    def app(self):
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
        from starlette.routing import Route

        def chunk(text: str | None, finish: str | None = None) -> str:
            delta = {"content": text} if text is not None else {}
            return "data: " + json.dumps({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}) + "\n\n"

        async def models(request: Request):
            return JSONResponse({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

        async def chat(request: Request):
            body = await request.json()
            self.requests.append(body)
            mode = body["messages"][-1]["content"].partition("MODE:")[2].split()[0] if "MODE:" in \
                body["messages"][-1]["content"] else "ok"
            if mode == "500":
                return JSONResponse({"error": {"message": "out of memory"}}, status_code=500)
            if mode == "json":
                return JSONResponse({"choices": []})  # not an SSE stream
            if mode == "text":
                return PlainTextResponse("<html>bad gateway</html>", status_code=200)

            async def events():
                try:
                    if mode == "hang":
                        await asyncio.sleep(READ_TIMEOUT_S * 5)
                    yield chunk("Hello")
                    if mode == "garbage":
                        yield "data: {not json\n\n"
                    if mode == "drop":
                        return  # the connection ends with no finish reason and no [DONE]
                    if mode == "together":  # hold until 4 streams are open at once (or give up after 5 s)
                        self.active += 1
                        self.most_active = max(self.most_active, self.active)
                        for _ in range(100):
                            if self.most_active >= 4:
                                break
                            await asyncio.sleep(0.05)
                        self.most_active = max(self.most_active, self.active)
                        self.active -= 1
                    if mode == "slow":
                        for _ in range(400):  # ~20 s unless the client goes away
                            await asyncio.sleep(0.05)
                            yield chunk(" x")
                    yield chunk(" there.")
                    yield chunk(None, "stop")
                    yield "data: " + json.dumps({"choices": [], "usage": {"prompt_tokens": 7,
                                                                           "completion_tokens": 2}}) + "\n\n"
                    yield "data: [DONE]\n\n"
                finally:
                    self.closed_streams.set()

            return StreamingResponse(events(), media_type="text/event-stream")

        return Starlette(routes=[Route("/v1/models", models), Route("/v1/chat/completions", chat, methods=["POST"])])


@pytest.fixture(scope="module")
def fake() -> Iterator[tuple[FakeEngine, str]]:
    engine = FakeEngine()
    url, server, thread = _serve(engine.app())
    yield engine, url
    server.should_exit = True  # type: ignore[attr-defined]
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def gateway(fake) -> Iterator[str]:
    _, url = fake
    backend = UpstreamBackend(url + "/v1", read_timeout_s=READ_TIMEOUT_S)
    url, server, thread = _serve(create_app(backend, domain="auto", api_key="k"))
    yield url
    server.should_exit = True  # type: ignore[attr-defined]
    thread.join(timeout=10)
    backend.close()


def _client(url: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": "Bearer k"}, timeout=30)


def _body(text: str, **kw) -> dict:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": 16, **kw}


def _sse(response: httpx.Response) -> list[dict | str]:
    out: list[dict | str] = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_reply_streams_through_with_the_care_layer(fake, gateway):
    engine, _ = fake
    with _client(gateway) as c:
        assert c.post("/v1/chat/completions", json=_body("hi"), headers={"Authorization": "Bearer no"}).status_code == 401
        body = _body(FLAGGED, stream=True, care_emergency_reply="model")  # the model's reply, asked for anyway
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = _sse(r)
    texts = [e["choices"][0]["delta"].get("content", "") for e in events if isinstance(e, dict) and e["choices"]]
    content = "".join(texts)
    first_text = next(t for t in texts if t)
    assert first_text.startswith("[SAFETY chest_pain]")  # the notice comes before any upstream token
    assert "Hello there." in content and events[-1] == "[DONE]"
    sent = engine.requests[-1]
    assert sent["stream"] is True and sent["model"] == "fake-model"
    assert sent["messages"][0]["role"] == "system" and sent["messages"][-1]["content"] == FLAGGED
    # Medical framing is added by the gateway, after the engine's reply.
    assert content.index("Hello there.") < len(content) - len("Hello there.")
    finals = [e for e in events if isinstance(e, dict) and e["choices"] and e["choices"][0]["finish_reason"]]
    assert finals and finals[-1]["usage"]["completion_tokens"] == 2


def test_flagged_turn_is_the_notice_and_card_and_never_reaches_the_engine(fake, gateway):
    from care.runtime import triage
    from care.runtime.server import card_text, notice_text
    from care.runtime.session import flagged

    engine, _ = fake
    notice, card = flagged(triage.assess([FLAGGED]), triage.load_rules())
    before = len(engine.requests)
    with _client(gateway) as c:
        r = c.post("/v1/chat/completions", json=_body(FLAGGED))
        with c.stream("POST", "/v1/chat/completions", json=_body(FLAGGED, stream=True)) as s:
            events = _sse(s)
    assert r.status_code == 200
    out = r.json()
    assert out["care_safety"][0]["category"] == "chest_pain" and out["care_card"][0]["category"] == "chest_pain"
    assert out["choices"][0]["message"]["content"] == notice_text(notice) + card_text(card)
    streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in events if isinstance(e, dict) and e["choices"])
    assert streamed == notice_text(notice) + card_text(card) and events[-1] == "[DONE]"
    assert len(engine.requests) == before  # llama-server was never asked


@pytest.mark.parametrize("mode, status, words", [
    ("500", 502, "out of memory"),
    ("json", 502, "not an SSE stream"),
    ("text", 502, "not an SSE stream"),
    ("garbage", 502, "malformed JSON"),
    ("drop", 502, "closed the stream"),
    ("hang", 504, "in time"),
])
@pytest.mark.parametrize("stream", [True, False])
def test_upstream_failures_become_gateway_errors(gateway, mode, status, words, stream):
    started = time.monotonic()
    with _client(gateway) as c:
        r = c.post("/v1/chat/completions", json=_body(f"Tell me a fact MODE:{mode}", stream=stream))
    assert time.monotonic() - started < READ_TIMEOUT_S * 4  # never hangs past the read timeout
    if stream and mode in ("garbage", "drop"):
        # The engine failed after its first token went out: the 200 is sent, the stream ends in an error event.
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        assert events[1]["choices"][0]["delta"]["content"] == "Hello"
        error = events[-1]["error"]
        assert error["code"] == status and "[DONE]" not in r.text
    else:
        assert r.status_code == status, r.text
        error = r.json()["error"]
    assert words in error["message"] and error["type"] == "upstream_error"


def test_failure_after_the_notice_is_an_sse_error_event(gateway):
    """A flagged message: the notice is never held back for the engine. It goes out first, at once, and an
    engine that fails (before or after its first token) ends the stream with an OpenAI-style error event, not
    a silent cut; without streaming, the error itself carries the notice."""
    for mode, words in (("500", "out of memory"), ("garbage", "malformed JSON")):
        body = _body(f"{FLAGGED} MODE:{mode}", stream=True, care_emergency_reply="model")
        with _client(gateway) as c, c.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            events = _sse(r)
        assert events[1]["choices"][0]["delta"]["content"].startswith("[SAFETY chest_pain]")
        assert words in events[-1]["error"]["message"] and "[DONE]" not in events
    with _client(gateway) as c:
        r = c.post("/v1/chat/completions", json=_body(f"{FLAGGED} MODE:500", care_emergency_reply="model"))
    assert r.status_code == 502
    assert r.json()["error"]["message"].startswith("[SAFETY chest_pain]") and "out of memory" in r.text
    assert r.json()["care_safety"][0]["category"] == "chest_pain"


def test_requests_reach_the_engine_concurrently(fake, gateway):
    """No lock in the gateway: 4 clients are 4 open upstream streams at once (what lets llama-server batch)."""
    engine, _ = fake
    engine.most_active = 0
    codes: list[int] = []

    def one() -> None:
        with _client(gateway) as c:
            codes.append(c.post("/v1/chat/completions", json=_body("Tell me a fact MODE:together")).status_code)

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert codes == [200] * 4 and engine.most_active == 4


def test_client_disconnect_cancels_the_upstream_stream(fake, gateway):
    engine, _ = fake
    engine.closed_streams.clear()
    with _client(gateway) as c, c.stream("POST", "/v1/chat/completions",
                                         json=_body("Count slowly MODE:slow", stream=True)) as r:
        assert r.status_code == 200
        for n, _line in enumerate(r.iter_lines()):
            if n > 6:
                break
        assert not engine.closed_streams.is_set()
    # The fake's stream would run ~20 s; the gateway must drop it as soon as its own client is gone.
    assert engine.closed_streams.wait(5), "the upstream stream was not closed after the client disconnected"


def test_unreachable_upstream_is_a_one_line_error():
    port = _free_port()  # nothing listens there
    started = time.monotonic()
    with pytest.raises(UpstreamError) as info:
        UpstreamBackend(f"http://127.0.0.1:{port}/v1")
    assert time.monotonic() - started < 5
    assert info.value.status == 502 and f"127.0.0.1:{port}" in info.value.one_line()


def test_estimated_token_counts_over_count(fake, smollm_engine):
    """Without /tokenize, fitting uses a conservative estimate: never below what a real tokenizer gives."""
    _, url = fake
    backend = UpstreamBackend(url)
    try:
        assert backend.llama_server is False
        for text in ("The patient reports a mild headache since yesterday, no fever.", "Ça va mieux, merci.",
                     "頭痛がします。", "x = [1, 2, 3]; y = {'a': 0.5}"):
            assert backend.count_tokens(text) >= len(smollm_engine.tokenize(text)), text
    finally:
        backend.close()


# -- a real llama-server on loopback -------------------------------------------------------------------------

def _llama_server() -> Path | None:
    from care.toolchain.llamacpp import find_tools

    found = os.environ.get("CARE_LLAMA_SERVER") or shutil.which("llama-server")
    if found:
        return Path(found)
    tools = find_tools(["llama-server"])
    return tools["llama-server"] if tools else None


@pytest.mark.slow
def test_gateway_over_a_real_llama_server(embedded_gguf):
    binary = _llama_server()
    if binary is None:
        pytest.skip("llama-server is not built: `make tools` or `care export setup --tools` (cached once per "
                    "llama.cpp version), or set CARE_LLAMA_SERVER to a llama-server binary")
    port = _free_port()
    proc = subprocess.Popen([str(binary), "-m", str(embedded_gguf), "--host", "127.0.0.1", "--port", str(port),
                             "-np", "2", "-c", "4096", "-t", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        backend = UpstreamBackend(f"http://127.0.0.1:{port}/v1")
        assert backend.llama_server and backend.n_ctx == 2048  # the slot's share of -c 4096 over -np 2
        assert backend.count_tokens("hello world") == len(backend.tokenize("hello world")) > 0
        url, server, thread = _serve(create_app(backend, domain="auto"))
        try:
            with httpx.Client(base_url=url, timeout=60) as c, \
                    c.stream("POST", "/v1/chat/completions",
                             json=_body(FLAGGED, stream=True, temperature=0)) as r:
                assert r.status_code == 200
                events = _sse(r)
        finally:
            server.should_exit = True  # type: ignore[attr-defined]
            thread.join(timeout=10)
            backend.close()
        texts = [e["choices"][0]["delta"].get("content", "") for e in events if isinstance(e, dict) and e["choices"]]
        assert next(t for t in texts if t).startswith("[SAFETY chest_pain]")
        assert len("".join(texts)) > len(texts[1]) and events[-1] == "[DONE]"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_cli_errors_are_one_line(capsys):
    from care.cli import main

    port = _free_port()  # nothing listens there: refused before any model or server starts
    assert main(["serve", "--upstream", f"http://127.0.0.1:{port}/v1", "--port", str(_free_port())]) == 2
    err = capsys.readouterr().err.strip()
    assert f"127.0.0.1:{port}" in err and "--upstream" in err and len(err.splitlines()) <= 2
    assert main(["export", "setup", "--tools", "llama-nonsense"]) == 2  # checked before anything is built
    err = capsys.readouterr().err.strip()
    assert "llama-nonsense" in err and "llama-server" in err
