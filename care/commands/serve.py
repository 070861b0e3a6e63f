"""`care serve`: an OpenAI-compatible chat server (/v1/chat/completions, /v1/models) over a GGUF or ONNX folder."""

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
    parser.add_argument("--lang", default=None, metavar="CODES", help="languages of safety notices, e.g. en,fr")
    parser.add_argument("--max-body-bytes", type=int, default=None, metavar="N",
                        help="larger request bodies get 413 (default 4 MiB)")
    parser.add_argument("--max-messages", type=int, default=None, metavar="N",
                        help="requests with more messages get 400 (default 512)")


def run(args: argparse.Namespace) -> int:
    from care.errors import require
    from care.runtime.server import check_bind, create_app

    api_key = args.api_key or os.environ.get("CARE_API_KEY") or None
    check_bind(args.host, api_key)  # before loading the model: fail fast
    require("uvicorn", "runtime")
    require("starlette", "runtime")
    import uvicorn

    from care.runtime.loader import load_from_args

    engine = load_from_args(args)
    try:
        limits = {k: v for k, v in (("max_body_bytes", args.max_body_bytes), ("max_messages", args.max_messages))
                  if v is not None}
        app = create_app(engine, domain=args.domain, api_key=api_key, languages=parse_languages(args.lang), **limits)
        shown = "localhost" if args.host in ("127.0.0.1", "::1") else args.host
        print(f"Serving {engine.model_name} ({engine.quant_type}, n_ctx {engine.n_ctx}) on "
              f"http://{shown}:{args.port}/v1  (OpenAI-compatible; Ctrl+C stops)"
              + ("  API key required" if api_key else ""), file=sys.stderr)
        uvicorn.run(app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning")
    finally:
        engine.close()
    return 0
