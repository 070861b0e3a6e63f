"""`care serve`: an OpenAI-compatible chat server (/v1/chat/completions, /v1/models) over a GGUF or ONNX folder,
or, with --upstream, the CARE layer in front of another OpenAI-compatible engine (llama-server, vLLM, Ollama)."""

from __future__ import annotations

import argparse
import os
import sys

from care.commands.chat import add_engine_arguments, add_sampling_arguments
from care.runtime.loader import parse_languages


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    add_sampling_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1, this machine only); 0.0.0.0 for the "
                             "clinic LAN requires --api-key")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--api-key", default=None,
                        help="clients must send 'Authorization: Bearer KEY' (default: $CARE_API_KEY)")
    parser.add_argument("--domain", default="auto", choices=["auto", "banking", "telecom", "medical", "general"],
                        help="system prompt domain (default: detected from each conversation's first message)")
    parser.add_argument("--lang", default=None, metavar="CODES",
                        help="languages the clinic serves, e.g. sw,en (notices and first-aid cards in the user's "
                        "language when it is one of them)")
    parser.add_argument("--emergency-reply", default="card", choices=["card", "model"],
                        help="a flagged turn answers with the notice and first-aid card only (card, the default), or "
                        "adds the model's own reply, labelled and checked (model); a request's care_emergency_reply "
                        "overrides it")
    parser.add_argument("--max-body-bytes", type=int, default=None, metavar="N",
                        help="larger request bodies get 413 (default 4 MiB)")
    parser.add_argument("--max-messages", type=int, default=None, metavar="N",
                        help="requests with more messages get 400 (default 512)")
    up = parser.add_argument_group("upstream engine (many users at once)")
    up.add_argument("--upstream", default=None, metavar="URL",
                    help="forward generation to an OpenAI-compatible engine, e.g. http://127.0.0.1:8081/v1 "
                         "(llama-server -np 4, vLLM, Ollama, or a load balancer in front of several); "
                         "safety notices, domain prompts, framing, context fitting and --api-key stay here")
    up.add_argument("--upstream-key", default=None, metavar="KEY",
                    help="the upstream engine's API key (default: $CARE_UPSTREAM_KEY)")
    up.add_argument("--upstream-model", default=None, metavar="NAME",
                    help="model name to request upstream (default: the first in its /v1/models)")
    up.add_argument("--upstream-timeout", type=float, default=120.0, metavar="S",
                    help="seconds to wait for the upstream's next token before answering 504 (default 120)")


def pairing_text(host: str, port: int, api_key: str | None) -> str:
    """Where phones open the web chat: this machine's own address, or, on the clinic network, a pairing link
    that carries the key (the page keeps it and takes it out of the address bar) and its QR code."""
    from care.runtime.server import lan_addresses

    if not api_key:
        return f"Web chat on this computer: http://localhost:{port}/"
    hosts = lan_addresses() if host in ("0.0.0.0", "::") else [host]
    links = [f"http://{h}:{port}/#key={api_key}" for h in hosts] or [f"http://<this computer's address>:{port}/#key=KEY"]
    out = ["Phones and tablets on the clinic network: open (or scan) " + links[0]]
    out += [f"  or {link}" for link in links[1:]]
    try:
        import io

        import segno

        buf = io.StringIO()
        segno.make(links[0], error="m").terminal(out=buf, compact=True)
        out.append(buf.getvalue().rstrip("\n"))
    except ImportError:
        out.append("(pip install segno to show the link as a QR code)")
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    from care.errors import require
    from care.runtime.server import check_bind, create_app

    api_key = args.api_key or os.environ.get("CARE_API_KEY") or None
    check_bind(args.host, api_key)  # before loading the model: fail fast
    require("uvicorn", "runtime")
    require("starlette", "runtime")
    import uvicorn

    from care.commands.chat import engine_config_from_args, load_engine

    if args.upstream:
        from care.runtime.upstream import UpstreamBackend

        engine = UpstreamBackend(args.upstream, api_key=args.upstream_key or os.environ.get("CARE_UPSTREAM_KEY"),
                                 model=args.upstream_model, config=engine_config_from_args(args),
                                 n_ctx=args.n_ctx, read_timeout_s=args.upstream_timeout)
    else:
        engine = load_engine(args)
    try:
        limits = {k: v for k, v in (("max_body_bytes", args.max_body_bytes), ("max_messages", args.max_messages))
                  if v is not None}
        app = create_app(engine, domain=args.domain, api_key=api_key, languages=parse_languages(args.lang),
                         emergency_reply=args.emergency_reply, **limits)
        shown = "localhost" if args.host in ("127.0.0.1", "::1") else args.host
        via = f" via {args.upstream}" if args.upstream else ""
        print(f"Serving {engine.model_name}{via} ({engine.quant_type}, n_ctx {engine.n_ctx}) on "
              f"http://{shown}:{args.port}/v1  (OpenAI-compatible; Ctrl+C stops)"
              + ("  API key required" if api_key else ""), file=sys.stderr)
        print(pairing_text(args.host, args.port, api_key), file=sys.stderr)
        uvicorn.run(app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning")
    finally:
        engine.close()
    return 0
