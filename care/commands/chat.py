"""`care chat`: the Textual chat app, or `--once "question"` for scripts (streams to stdout)."""

from __future__ import annotations

import argparse
import sys


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by every command that loads a GGUF through the runtime engine."""
    parser.add_argument("--model", "-m", default=None, help="a .gguf file, a folder with one, or a known name "
                        "(default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--n-ctx", type=int, default=4096, help="context length in tokens (default 4096)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: idle physical cores)")
    parser.add_argument("--chat-template", default=None,
                        help="template for a GGUF that has none: chatml, phi3, llama3 or a Jinja file")
    parser.add_argument("--lora", default=None, help="a GGUF LoRA adapter to apply on top of the model")


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--top-k", type=int, default=40)
    parser.add_argument("--repeat-penalty", type=float, default=1.1)
    parser.add_argument("--seed", type=int, default=None)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    add_sampling_arguments(parser)
    parser.add_argument("--once", metavar="TEXT", default=None,
                        help="answer one message, stream it to stdout and exit (use - to read stdin)")
    parser.add_argument("--system", default=None, help="system prompt (overrides the domain prompt)")
    parser.add_argument("--stats", action="store_true", help="with --once: print tokens/s and TTFT to stderr")


def engine_config_from_args(args: argparse.Namespace):
    from pathlib import Path

    from care.runtime.engine import EngineConfig, SamplingConfig

    template = args.chat_template
    if template and Path(template).is_file():
        template = Path(template).read_text(encoding="utf-8")
    return EngineConfig(
        n_ctx=args.n_ctx,
        n_threads=args.threads,
        chat_template=template,
        lora_path=args.lora,
        sampling=SamplingConfig(
            temperature=getattr(args, "temperature", 0.7),
            top_p=getattr(args, "top_p", 0.9),
            top_k=getattr(args, "top_k", 40),
            repeat_penalty=getattr(args, "repeat_penalty", 1.1),
            seed=getattr(args, "seed", None),
            max_tokens=getattr(args, "max_tokens", 512),
        ),
    )


def load_engine(args: argparse.Namespace):
    from care.models import resolve_gguf
    from care.runtime.engine import ChatEngine

    return ChatEngine(resolve_gguf(args.model), engine_config_from_args(args))


def run(args: argparse.Namespace) -> int:
    if args.once is None:
        from care.tui.app import run_from_args

        return run_from_args(args)
    text = sys.stdin.read() if args.once == "-" else args.once
    from care.errors import UsageError

    if not text.strip():
        raise UsageError("Empty message", hint='Pass the question, e.g. care chat --once "How do I block a card?"')
    engine = load_engine(args)
    messages = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    messages.append({"role": "user", "content": text})
    last = None
    for chunk in engine.stream(messages):
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        last = chunk
    sys.stdout.write("\n")
    if args.stats and last is not None:
        print(f"[{last.completion_tokens} tokens, {last.tokens_per_s:.1f} tok/s, "
              f"TTFT {last.ttft_s or 0:.2f}s, finish: {last.finish_reason}]", file=sys.stderr)
    engine.close()
    return 0
