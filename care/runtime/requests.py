"""Checking an OpenAI chat-completions request before it reaches the model (care serve).

`parse_request` turns the JSON body into a `ChatRequest` or raises `UsageError` whose message names the field
(`messages[2].content`, `temperature`, ...), so the server answers 400 with it and never 500. Parameters this
server does not implement are refused by name instead of being silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from care.domains import DOMAINS
from care.errors import UsageError
from care.runtime.backend import Message, SamplingConfig

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024  # 4 MiB: far above any conversation that fits a small model's context
DEFAULT_MAX_MESSAGES = 512

ROLES = ("system", "user", "assistant")
ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system message
# OpenAI features this server does not have; a request that asks for them gets a 400 naming them.
UNSUPPORTED = {
    "tools": "tool calls", "tool_choice": "tool calls", "functions": "function calls",
    "function_call": "function calls", "parallel_tool_calls": "tool calls", "logprobs": "logprobs",
    "top_logprobs": "logprobs", "logit_bias": "logit_bias", "audio": "audio output", "prediction": "predicted outputs",
    "presence_penalty": "presence_penalty (use repeat_penalty)",
    "frequency_penalty": "frequency_penalty (use repeat_penalty)", "web_search_options": "web search",
    "reasoning_effort": "reasoning_effort",
}
# Values of the unsupported parameters that mean "not used" (clients often send the defaults).
_OFF = (None, False, 0, 0.0, [], {}, "none", "auto")


@dataclass
class ChatRequest:
    history: list[Message]  # the messages before the last user message
    text: str  # the last user message
    sampling: SamplingConfig
    stream: bool = False
    json_mode: bool = False  # response_format json_object / json_schema
    model: str | None = None  # the `model` field: picks a LoRA adapter by name on a server started with --adapters
    lora: list[tuple[int, float]] | None = None  # llama-server's per-request [{"id", "scale"}] adapters
    emergency_reply: str | None = None  # `care_emergency_reply`: "card" (the default) or "model" on a flagged turn
    domain: str | None = None  # `care_domain`: this conversation's support domain (the web chat's choice)


def _bad(field: str, problem: str, hint: str | None = None) -> UsageError:
    return UsageError(f"`{field}` {problem}", hint=hint)


def _number(body: dict[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(name, f"must be a number, not {type(value).__name__}")
    if not lo <= value <= hi:
        raise _bad(name, f"must be between {lo:g} and {hi:g}, not {value}")
    return float(value)


def _integer(body: dict[str, Any], name: str, default: int | None, lo: int, hi: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, f"must be an integer, not {type(value).__name__}")
    if value < lo or (hi is not None and value > hi):
        raise _bad(name, f"must be at least {lo}" + (f" and at most {hi}" if hi is not None else "") + f", not {value}")
    return value


def _content(value: Any, field: str) -> str:
    """OpenAI content: a string, null, or a list of parts of which only text parts are supported."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise _bad(field, f"must be a string or a list of text parts, not {type(value).__name__}")
    texts = []
    for j, part in enumerate(value):
        where = f"{field}[{j}]"
        if not isinstance(part, dict):
            raise _bad(where, f"must be an object like {{\"type\": \"text\", \"text\": ...}}, not {type(part).__name__}")
        kind = part.get("type")
        if kind != "text":
            raise _bad(where, f"has type {kind!r}: only text content is supported (no images, audio or files)")
        if not isinstance(part.get("text"), str):
            raise _bad(f"{where}.text", "must be a string")
        texts.append(part["text"])
    return "".join(texts)


def _messages(value: Any, max_messages: int) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise _bad("messages", "must be a non-empty list of {\"role\", \"content\"} objects")
    if len(value) > max_messages:
        raise _bad("messages", f"has {len(value)} messages, over this server's limit of {max_messages}",
                   hint="Send fewer (older turns are trimmed anyway), or start the server with a higher --max-messages")
    out: list[Message] = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(where, f"must be an object with role and content, not {type(m).__name__}")
        role = m.get("role")
        role = ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
        if role not in ROLES:
            if role in ("tool", "function"):
                raise _bad(f"{where}.role", f"is {role!r}: tool calls are not supported")
            raise _bad(f"{where}.role", f"must be one of {', '.join(ROLES)}, not {role!r}")
        for key in ("tool_calls", "function_call", "audio"):
            if m.get(key) not in _OFF:
                raise _bad(f"{where}.{key}", "is not supported by this server")
        out.append({"role": role, "content": _content(m.get("content"), f"{where}.content")})
    if out[-1]["role"] != "user" or not out[-1]["content"].strip():
        raise _bad(f"messages[{len(out) - 1}]", "must be a non-empty user message (the one to answer)")
    return out


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value else ()
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        if len(value) > 4:
            raise _bad("stop", f"has {len(value)} strings; at most 4")
        return tuple(v for v in value if v)
    raise _bad("stop", "must be a string or a list of strings")


def _response_format(value: Any) -> dict[str, Any] | None:
    """The JSON schema the reply must follow ({} for any JSON object), or None for free text."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _bad("response_format", "must be an object like {\"type\": \"json_object\"}")
    kind = value.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return {}
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise _bad("response_format.json_schema.schema", "must be a JSON schema object")
        return spec["schema"]
    raise _bad("response_format.type", f"must be text, json_object or json_schema, not {kind!r}")


def _lora(value: Any) -> list[tuple[int, float]] | None:
    """llama-server's `"lora": [{"id": 0, "scale": 1.0}, ...]` (ids index GET /v1/models' adapters)."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise _bad("lora", "must be a list like [{\"id\": 0, \"scale\": 1.0}]")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, dict) or isinstance(item.get("id"), bool) or not isinstance(item.get("id"), int):
            raise _bad(f"lora[{i}].id", "must be an integer adapter id (see GET /v1/models)")
        scale = item.get("scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not -4.0 <= scale <= 4.0:
            raise _bad(f"lora[{i}].scale", "must be a number between -4 and 4")
        out.append((int(item["id"]), float(scale)))
    return out


def parse_request(body: Any, base: SamplingConfig, max_messages: int = DEFAULT_MAX_MESSAGES) -> ChatRequest:
    """A checked request, or UsageError naming the first field that is wrong or unsupported."""
    if not isinstance(body, dict):
        raise UsageError(f"The request body must be a JSON object, not a JSON {type(body).__name__}",
                         hint='Send {"messages": [{"role": "user", "content": "..."}]}')
    unsupported = sorted(k for k in body if k in UNSUPPORTED and body[k] not in _OFF)
    if unsupported:
        names = ", ".join(f"`{k}` ({UNSUPPORTED[k]})" for k in unsupported)
        raise UsageError(f"Not supported by this server: {names}", hint="Leave these parameters out")
    n = _integer(body, "n", 1, 1)
    if n != 1:
        raise _bad("n", f"is {n}: this server returns one choice per request", hint="Leave n out or send 1")
    messages = _messages(body.get("messages"), max_messages)
    stream = body.get("stream", False)
    if not isinstance(stream, bool | None):
        raise _bad("stream", "must be true or false")
    schema = _response_format(body.get("response_format"))
    if schema is not None and stream:
        raise _bad("response_format", "is not supported with stream: true", hint="Send stream: false for JSON output")
    max_tokens = _integer(body, "max_completion_tokens", None, 1)
    max_tokens = _integer(body, "max_tokens", max_tokens, 1) or base.max_tokens
    seed = _integer(body, "seed", base.seed, 0, 2**32 - 1)
    sampling = replace(
        base,
        temperature=_number(body, "temperature", base.temperature, 0.0, 2.0),
        top_p=_number(body, "top_p", base.top_p, 0.0, 1.0),
        top_k=int(_integer(body, "top_k", base.top_k, 0) or 0),
        repeat_penalty=_number(body, "repeat_penalty", base.repeat_penalty, 0.0, 10.0),
        seed=seed,
        max_tokens=max_tokens,
        stop=_stop(body.get("stop")),
        json_schema=schema,
    )
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("model", "must be a string (see GET /v1/models)")
    reply = body.get("care_emergency_reply")
    if reply is not None and reply not in ("card", "model"):
        raise _bad("care_emergency_reply", f"must be \"card\" or \"model\", not {reply!r}",
                   hint="card: the notice and first-aid card only; model: the assistant's own reply after them")
    domain = body.get("care_domain")
    if domain is not None and domain not in (*DOMAINS, "auto"):
        raise _bad("care_domain", f"must be one of {', '.join((*DOMAINS, 'auto'))}, not {domain!r}")
    return ChatRequest(history=messages[:-1], text=messages[-1]["content"], sampling=sampling,
                       stream=bool(stream), json_mode=schema is not None, model=model, lora=_lora(body.get("lora")),
                       emergency_reply=reply, domain=domain)
