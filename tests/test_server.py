"""`care serve`'s app on a real listening port on 127.0.0.1, driven by a real HTTP client (httpx)."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from care.errors import UsageError
from care.runtime.server import check_bind, create_app

KEY = "test-key-123"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server_url(smollm_engine):
    import uvicorn

    port = _free_port()
    app = create_app(smollm_engine, domain="auto", api_key=KEY)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def _client(url: str, key: str | None = KEY) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=url, headers=headers, timeout=60)


def _body(text: str, **kw) -> dict:
    return {"model": "care", "messages": [{"role": "user", "content": text}], "max_tokens": 12,
            "temperature": 0, **kw}


def test_models_and_auth(server_url):
    with _client(server_url) as c:
        r = c.get("/v1/models")
        assert r.status_code == 200
        assert r.json()["data"][0]["n_ctx"] == 2048
    with _client(server_url, key=None) as c:
        assert c.get("/v1/models").status_code == 401
        assert c.post("/v1/chat/completions", json=_body("hi")).status_code == 401
    with _client(server_url, key="wrong") as c:
        assert c.get("/v1/models").status_code == 401


def test_non_streaming_matches_engine(server_url, smollm_engine):
    from care.domains import system_prompt
    from care.runtime.backend import SamplingConfig

    with _client(server_url) as c:
        r = c.post("/v1/chat/completions", json=_body("How do I block my lost bank card?"))
    assert r.status_code == 200, r.text
    data = r.json()
    content = data["choices"][0]["message"]["content"]
    assert data["care_domain"] == "banking" and data["care_safety"] == []
    assert data["usage"]["completion_tokens"] >= 1 and data["choices"][0]["finish_reason"] in ("stop", "length")
    # Same conversation straight through the engine (greedy): same text.
    direct = smollm_engine.chat(
        [{"role": "system", "content": system_prompt("banking")},
         {"role": "user", "content": "How do I block my lost bank card?"}],
        SamplingConfig(temperature=0, max_tokens=12, top_k=40, top_p=0.9, repeat_penalty=1.1))
    assert content == direct.text


def test_streaming_sse_with_safety_notice_first(server_url):
    with _client(server_url) as c, c.stream(
            "POST", "/v1/chat/completions",
            json=_body("My father has crushing chest pain and is sweating", stream=True)) as r:
        assert r.status_code == 200
        card = "".join(json.loads(ln[6:])["choices"][0]["delta"].get("content", "")
                       for ln in r.iter_lines() if ln.startswith("data: {"))
    assert card.startswith("[SAFETY chest_pain]") and "While help comes:" in card  # by default: notice + card
    with _client(server_url) as c, c.stream(
            "POST", "/v1/chat/completions",
            json=_body("My father has crushing chest pain and is sweating", stream=True,
                       care_emergency_reply="model")) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
    deltas = [ch["choices"][0]["delta"].get("content", "") for ch in chunks]
    text = "".join(deltas)
    first_text = next(d for d in deltas if d)
    assert first_text.startswith("[SAFETY chest_pain]")
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert "not a diagnosis" in text  # medical domain detected: framing appended
    # A flagged reply is released a sentence at a time (checked against the notice); others word by word.
    assert len([d for d in deltas if d]) >= 3
    with _client(server_url) as c, c.stream(
            "POST", "/v1/chat/completions", json=_body("How do I block my lost bank card?", stream=True)) as r:
        deltas = [json.loads(ln[6:])["choices"][0]["delta"].get("content", "")
                  for ln in r.iter_lines() if ln.startswith("data: ") and ln != "data: [DONE]"]
    assert len([d for d in deltas if d]) > 3  # really streamed, not one blob


def test_bad_requests_keep_server_usable(server_url):
    with _client(server_url) as c:
        assert c.post("/v1/chat/completions", content=b"{not json",
                      headers={"content-type": "application/json"}).status_code == 400
        assert c.post("/v1/chat/completions", json={"messages": []}).status_code == 400
        r = c.post("/v1/chat/completions", json=_body("word " * 3000))
        assert r.status_code == 400 and "too long" in r.json()["error"]["message"]
        r = c.post("/v1/chat/completions", json=_body("word " * 3000, stream=True))
        assert r.status_code == 400
        assert c.post("/v1/chat/completions", json=_body("Hello")).status_code == 200


def test_client_disconnect_mid_stream_frees_engine(server_url):
    with _client(server_url) as c:
        with c.stream("POST", "/v1/chat/completions",
                      json=_body("Tell me a long story about a bank", stream=True, max_tokens=200)) as r:
            for n, _ in enumerate(r.iter_lines()):
                if n > 3:
                    break
        t0 = time.time()
        r = c.post("/v1/chat/completions", json=_body("Hi"))
        assert r.status_code == 200
        assert time.time() - t0 < 30


def test_bind_beyond_loopback_needs_key():
    check_bind("127.0.0.1", None)
    check_bind("::1", None)
    check_bind("0.0.0.0", "k")
    with pytest.raises(UsageError, match="API key"):
        check_bind("0.0.0.0", None)
    with pytest.raises(UsageError):
        check_bind("192.168.1.20", None)


@pytest.mark.parametrize(("body", "field"), [
    ([{"role": "user", "content": "hi"}], "JSON object"),
    ({"messages": ["hi"]}, "messages[0]"),
    ({"messages": [{"role": "user", "content": "a"}, 7]}, "messages[1]"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": {"text": "hi"}}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1.5}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": [1, 2]}, "stop"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, "stream"),
    ({"messages": [{"role": "user", "content": "hi"}], "response_format": "json"}, "response_format"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, "`n`"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, "`tools`"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, "messages[1]"),
])
def test_malformed_requests_get_400_naming_the_field(server_url, body, field):
    with _client(server_url) as c:
        r = c.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert field in r.json()["error"]["message"]


def test_text_parts_and_developer_role_are_accepted(server_url):
    body = {"messages": [{"role": "developer", "content": "Answer briefly."},
                         {"role": "user", "content": [{"type": "text", "text": "Hello"}]}],
            "max_tokens": 4, "temperature": 0, "n": 1, "tools": [], "logprobs": False}
    with _client(server_url) as c:
        r = c.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text


def test_body_and_message_limits(smollm_engine):
    from starlette.testclient import TestClient

    app = create_app(smollm_engine, max_body_bytes=2000, max_messages=3)
    with TestClient(app) as c:
        r = c.post("/v1/chat/completions", json=_body("word " * 1000))
        assert r.status_code == 413 and "2000-byte" in r.json()["error"]["message"]
        many = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}] * 2
        r = c.post("/v1/chat/completions", json={"messages": [*many, {"role": "user", "content": "ok"}]})
        assert r.status_code == 400 and "limit of 3" in r.json()["error"]["message"]


def test_json_schema_output_parses(server_url):
    schema = {"type": "object", "properties": {"domain": {"enum": ["banking", "telecom", "medical"]},
                                                "urgent": {"type": "boolean"}},
              "required": ["domain", "urgent"], "additionalProperties": False}
    body = _body("My card was stolen an hour ago. Classify this message.", max_tokens=40,
                 response_format={"type": "json_schema", "json_schema": {"name": "triage", "schema": schema}})
    with _client(server_url) as c:
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        data = json.loads(r.json()["choices"][0]["message"]["content"])
        assert data["domain"] in ("banking", "telecom", "medical") and isinstance(data["urgent"], bool)
        # json_object: any JSON object; a medical question keeps its safety notice out of the content.
        body = _body("My father has crushing chest pain. Reply as JSON with a key advice.", max_tokens=60,
                     response_format={"type": "json_object"})
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        content = out["choices"][0]["message"]["content"]
        assert content.lstrip().startswith("{") and "[SAFETY" not in content
        assert out["care_safety"] and out["care_safety"][0]["category"] == "chest_pain"
        if out["choices"][0]["finish_reason"] == "stop":
            assert isinstance(json.loads(content), dict)
