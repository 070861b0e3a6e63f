"""`care chat`: the Textual chat app, or `--once "question"` for scripts (streams to stdout)."""

from __future__ import annotations

import argparse
import sys

from care.runtime.backend import EngineConfig, SamplingConfig
from care.runtime.loader import EngineOptions, parse_languages

__all__ = ["add_arguments", "add_engine_arguments", "add_sampling_arguments", "engine_config_from_args",
           "engine_options", "load_engine", "loader_from_args", "parse_languages", "run", "sampling_from_args"]


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by every command that loads a GGUF through the runtime engine."""
    parser.add_argument("--model", "-m", default=None, help="a .gguf file, a folder with one, an ONNX folder from `care export onnx`, "
                        "or a known name "
                        "(default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--profile", choices=["laptop", "phone"], default="laptop",
                        help="device settings: laptop (llama.cpp defaults) or phone (2 threads, K/V cache "
                             "q8_0/q4_0 with flash attention, GGUF read into memory; see `care bench`)")
    parser.add_argument("--n-ctx", type=int, default=None, help="context length in tokens (default 4096)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: idle physical cores; phone profile: 2)")
    parser.add_argument("--kv-type", default=None, metavar="TYPE[/TYPE]",
                        help="KV-cache type: f16, q8_0, q4_0, or K/V such as q8_0/q4_0 (default: the profile's)")
    parser.add_argument("--context", default="drop", choices=["drop", "summarize"],
                        help="older turns that no longer fit the context: drop them (default) or summarize them "
                             "with the model into the system prompt")
    parser.add_argument("--chat-template", default=None,
                        help="template for a GGUF that has none: chatml, phi3, llama3 or a Jinja file")
    parser.add_argument("--lora", default=None, help="a GGUF LoRA adapter to apply on top of the model")
    parser.add_argument("--adapters", default=None, metavar="NAME=FILE,...|DIR",
                        help="per-domain GGUF LoRA adapters over one base, e.g. medical=med.gguf,banking=bank.gguf, "
                        "or a folder of `care export gguf-lora` outputs; the conversation's domain picks one")


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """The sampling options; their defaults are SamplingConfig's (the one home of sampling defaults)."""
    d = SamplingConfig()
    parser.add_argument("--max-tokens", type=int, default=d.max_tokens)
    parser.add_argument("--temperature", type=float, default=d.temperature)
    parser.add_argument("--top-p", type=float, default=d.top_p)
    parser.add_argument("--top-k", type=int, default=d.top_k)
    parser.add_argument("--repeat-penalty", type=float, default=d.repeat_penalty)
    parser.add_argument("--seed", type=int, default=d.seed)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    add_sampling_arguments(parser)
    parser.add_argument("--once", metavar="TEXT", default=None,
                        help="answer one message, stream it to stdout and exit (use - to read stdin)")
    parser.add_argument("--system", default=None, help="system prompt (overrides the domain prompt)")
    parser.add_argument("--domain", default="auto", choices=["auto", "banking", "telecom", "medical", "general"],
                        help="support domain and its system prompt (default: detected from the first message)")
    parser.add_argument("--lang", default=None, metavar="CODES",
                        help="languages the clinic serves, e.g. sw,en: notices and first-aid cards are shown in the "
                        "user's language when it is one of them (default: the clinic's safety.yaml, else en)")
    parser.add_argument("--ask-anyway", action="store_true",
                        help="with --once: on a flagged message, also show the model's own reply (labelled, checked) "
                        "after the notice and the first-aid card")
    parser.add_argument("--stats", action="store_true", help="with --once: print tokens/s and TTFT to stderr")


def _notice_line(notice) -> str:
    return f"[SAFETY {notice.category}] {notice.message}"


def sampling_from_args(args: argparse.Namespace) -> SamplingConfig:
    """SamplingConfig from the sampling options; an option a command does not have keeps SamplingConfig's default."""
    d = SamplingConfig()
    return SamplingConfig(
        temperature=getattr(args, "temperature", d.temperature),
        top_p=getattr(args, "top_p", d.top_p),
        top_k=getattr(args, "top_k", d.top_k),
        repeat_penalty=getattr(args, "repeat_penalty", d.repeat_penalty),
        seed=getattr(args, "seed", d.seed),
        max_tokens=getattr(args, "max_tokens", d.max_tokens),
    )


def engine_options(args: argparse.Namespace) -> EngineOptions:
    """The typed engine options (care.runtime.loader.EngineOptions) from the command line (chat, serve, the TUI)."""
    d = EngineOptions()
    return EngineOptions(
        model=getattr(args, "model", None),
        profile=getattr(args, "profile", None) or d.profile,
        kv_type=getattr(args, "kv_type", None),
        n_ctx=getattr(args, "n_ctx", None),
        threads=getattr(args, "threads", None),
        context=getattr(args, "context", None) or d.context,
        chat_template=getattr(args, "chat_template", None),
        lora=getattr(args, "lora", None),
        adapters=getattr(args, "adapters", None),
        sampling=sampling_from_args(args),
    )


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    from care.runtime.loader import engine_config

    return engine_config(engine_options(args))


def load_engine(args: argparse.Namespace):
    """The engine for --model with the command line's options (care.runtime.load_engine)."""
    from care.runtime.loader import load_with_options

    return load_with_options(engine_options(args))


def loader_from_args(args: argparse.Namespace):
    """The TUI's engine loader (care.tui.app.loader_for) with the command line's options."""
    from care.tui.app import loader_for

    return loader_for(engine_options(args))


def run(args: argparse.Namespace) -> int:
    if args.once is None:  # the Textual app, with the command line's options as typed values
        from care.tui.app import run_app

        return run_app(engine_options(args), domain=getattr(args, "domain", None) or "auto",
                       system=getattr(args, "system", None), languages=parse_languages(getattr(args, "lang", None)))
    text = sys.stdin.read() if args.once == "-" else args.once
    from care.errors import UsageError

    if not text.strip():
        raise UsageError("Empty message", hint='Pass the question, e.g. care chat --once "How do I block a card?"')
    from care.runtime import triage
    from care.runtime.session import ChatSession, ContextNote, FirstAidCard, SafetyNotice, flagged

    languages = parse_languages(args.lang)
    verdict = triage.assess([text])
    if verdict.emergency and not args.ask_anyway:  # the notice and the vetted card; no model needed
        notice, card = flagged(verdict, triage.load_rules(), languages)
        print(_notice_line(notice) + (f"\n\n{card.text}" if card else ""), flush=True)
        return 0
    engine = load_engine(args)
    try:
        session = ChatSession(engine, domain=args.domain, system=args.system, languages=languages,
                              emergency_reply="model" if args.ask_anyway else "card")
        last = None
        for event in session.send(text):
            if isinstance(event, SafetyNotice):
                # Marked and on stdout, before the answer: a script piping the answer must pass it on too.
                print(_notice_line(event), flush=True)
            elif isinstance(event, FirstAidCard):
                print(f"\n{event.text}\n", flush=True)
            elif isinstance(event, ContextNote):
                print(f"[note] {event.message}", file=sys.stderr)
            elif event.finish_reason is None:
                sys.stdout.write(event.text)
                sys.stdout.flush()
            else:
                last = event
        sys.stdout.write("\n")
        sys.stdout.flush()
        if args.stats and last is not None:
            print(f"[{last.completion_tokens} tokens, {last.tokens_per_s:.1f} tok/s, "
                  f"TTFT {last.ttft_s or 0:.2f}s, finish: {last.finish_reason}, domain: {session.domain}]",
                  file=sys.stderr)
    finally:
        engine.close()
    return 0
