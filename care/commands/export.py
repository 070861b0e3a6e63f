"""`care export gguf|gguf-lora|onnx|verify|setup`: merged HF model -> verified GGUF / ONNX files, or a LoRA
adapter -> a GGUF adapter verified on the quantized base."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

GGUF_TYPES = ("q4_k_m", "q4_0", "q5_k_m", "q6_k", "q8_0", "f16", "bf16", "f32", "iq4_xs", "q3_k_m", "q4_k_s",
              "q5_k_s", "q5_0")


HF_DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from care.runtime.profiles import PROFILES

    sub = parser.add_subparsers(dest="export_command", metavar="{gguf,gguf-lora,onnx,verify,setup}", required=True)

    g = sub.add_parser("gguf", help="GGUF for llama.cpp / Ollama (default --q4_k_m), verified against the source",
                       description="Convert a merged Hugging Face model folder to GGUF with llama.cpp's own "
                       "converter and quantizer, then verify every file against the source model.")
    g.add_argument("model_dir", help="merged Hugging Face model folder (from `care merge`)")
    g.add_argument("--out", "-o", required=True, help="output folder (GGUFs, manifest.json, Modelfile, verify.json)")
    types = g.add_argument_group("types (several at once; default --q4_k_m)")
    for q in GGUF_TYPES:
        types.add_argument(f"--{q}", dest="quants", action="append_const", const=q, help=argparse.SUPPRESS
                           if q in ("q4_k_s", "q5_k_s", "q5_0") else f"write a {q.upper()} file")
    types.add_argument("--phone", dest="quants", action="append_const", const="phone",
                       help=f"the phone profile's type ({PROFILES['phone']['quant'].upper()}, chosen by measured KL in "
                       "bench/phone_quant.py; add --imatrix, which it was measured with)")
    im = g.add_argument_group("importance matrix")
    im.add_argument("--imatrix", action="store_true",
                    help="quantize with an importance matrix computed on the recipe's training text (llama.cpp's "
                    "llama-imatrix; verification compares each type with and without it)")
    im.add_argument("--calibration", default=None, metavar="FILE",
                    help="calibration text for --imatrix instead of the recipe's: a .txt, or a .jsonl of rows "
                    "like the training data (query/response or messages)")
    im.add_argument("--imatrix-chunks", type=int, default=None, metavar="N",
                    help="at most N chunks of 512 tokens for the matrix (default 32)")
    g.add_argument("--no-verify", action="store_true", help="skip verification against the source model")
    g.add_argument("--hf-dtype", choices=HF_DTYPES, default="auto", help="dtype of the HF reference logits (auto: the checkpoint's own, bf16 for Phi-3.5: ~1x its size "
                   "in RAM; float32 needs 2x but is the only exact reference for an f16 file)")
    g.add_argument("--name", default=None, help="model name stored in the GGUF (default: the folder name)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads for quantize/verify")
    g.add_argument("--json", action="store_true", help="print the result as JSON")
    g.set_defaults(module_run=run_gguf)

    lo = sub.add_parser("gguf-lora", help="a LoRA adapter as a GGUF adapter (~1%% of the model), verified on the "
                        "quantized base", description="Convert a LoRA adapter folder (from `care train`) with "
                        "llama.cpp's convert_lora_to_gguf.py, then verify base GGUF + adapter against the "
                        "peft-merged model, beside a merged export of the same quant.")
    lo.add_argument("adapter_dir", help="LoRA adapter folder (adapter_config.json + adapter_model.safetensors)")
    lo.add_argument("--out", "-o", required=True, help="output folder (adapter GGUF, manifest.json, Modelfile)")
    lo.add_argument("--base", default=None, help="base model HF folder (default: from care_adapter.json / the "
                    "recipe next to the adapter / care_merge.json)")
    lo.add_argument("--outtype", choices=("f16", "q8_0"), default="f16", help="adapter tensor type (default f16)")
    lo.add_argument("--verify-base", default=None, metavar="BASE.gguf", help="the quantized base GGUF to verify on "
                    "(default: the embedded model when it is the base, else a q4_k_m export made into OUT/base/)")
    lo.add_argument("--no-verify", action="store_true", help="skip verification")
    lo.add_argument("--name", default=None, help="adapter name (default: the recipe name or the folder name)")
    lo.add_argument("--threads", type=int, default=None, help="CPU threads for quantize/verify")
    lo.add_argument("--json", action="store_true", help="print the result as JSON")
    lo.set_defaults(module_run=run_gguf_lora)

    o = sub.add_parser("onnx", help="ONNX via onnxruntime-genai's model builder (int4 default), verified",
                       description="Export a merged Hugging Face model folder to ONNX with onnxruntime-genai's "
                       "model builder, then verify logits against the source and generate a reply.")
    o.add_argument("model_dir", help="merged Hugging Face model folder (from `care merge`)")
    o.add_argument("--out", "-o", required=True, help="output folder")
    prec = o.add_mutually_exclusive_group()
    prec.add_argument("--int4", dest="precision", action="store_const", const="int4", help="int4 weights (default)")
    prec.add_argument("--int8", dest="precision", action="store_const", const="int8", help="int8 weights")
    prec.add_argument("--fp32", dest="precision", action="store_const", const="fp32", help="fp32 (reference)")
    o.add_argument("--int4-algo", default=None,
                   help="int4 algorithm for the builder (default: k_quant_mixed, chosen by measured quality)")
    o.add_argument("--no-verify", action="store_true", help="skip verification against the source model")
    o.add_argument("--threads", type=int, default=None)
    o.add_argument("--json", action="store_true", help="print the result as JSON")
    o.set_defaults(module_run=run_onnx, precision="int4")

    v = sub.add_parser("verify", help="verify a GGUF against its Hugging Face source folder",
                       description="Tokenizer parity, chat-template rendering, next-token agreement, KL and "
                       "perplexity of a GGUF against the HF model it was made from.")
    v.add_argument("file", help="the .gguf file")
    v.add_argument("--source", required=True, help="the Hugging Face model folder it was exported from")
    v.add_argument("--n-ctx", type=int, default=2048, help="context for the check (at most 4096)")
    v.add_argument("--threads", type=int, default=None)
    v.add_argument("--hf-dtype", choices=HF_DTYPES, default="auto", help="dtype of the HF reference logits (auto: the checkpoint's own, bf16 for Phi-3.5: ~1x its size "
                   "in RAM; float32 needs 2x but is the only exact reference for an f16 file)")
    v.add_argument("--report", default=None, help="also write the report to this JSON file")
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    v.set_defaults(module_run=run_verify)

    s = sub.add_parser("setup", help="fetch llama.cpp's converter matching the installed llama-cpp-python",
                       description="Download the llama-cpp-python sdist of the installed version with pip and "
                       "extract its convert_hf_to_gguf.py + gguf-py into the user data folder.")
    s.add_argument("--force", action="store_true", help="fetch again even if present")
    s.add_argument("--sdist", default=None, help="use this local llama_cpp_python-<version>.tar.gz (offline)")
    s.add_argument("--tools", nargs="*", default=None, metavar="NAME",
                   help="instead, build llama.cpp's own tools from the same source as the Python binding "
                        "(default: llama-server, for `care serve --upstream`); cached by version and flags")
    s.set_defaults(module_run=run_setup)


def run(args: argparse.Namespace) -> int:  # the dispatcher uses module_run; kept for direct callers
    return int(args.module_run(args))


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description:<18}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    transient=True, console=_console(stderr=True))


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr)


def print_verify_table(report: dict, title: str = "Verification against the HF model") -> None:
    from rich.table import Table

    from care.export.verify import format_table

    rows = format_table(report)
    table = Table(title=title)
    for col in rows[0]:
        table.add_column(col)
    for row in rows[1:]:
        table.add_row(*row)
    console = _console()
    console.print(table)
    for quant, entry in report["files"].items():
        for w in entry.get("warnings", []):
            console.print(f"[yellow]{quant}: {w}[/yellow]")
        for f in entry.get("failures", []):
            console.print(f"[red]{quant}: {f}[/red]")


def run_gguf(args: argparse.Namespace) -> int:
    from care.errors import VerificationError
    from care.export.gguf import export_gguf
    from care.runtime.profiles import PROFILES

    quants = tuple(PROFILES["phone"]["quant"] if q == "phone" else q for q in (args.quants or ("q4_k_m",)))
    with _progress() as bar:
        tasks: dict[str, int] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        try:
            result = export_gguf(args.model_dir, args.out, quants=quants, verify=not args.no_verify,
                                 name=args.name, n_threads=args.threads, progress=progress,
                                 imatrix=args.imatrix, calibration=args.calibration,
                                 imatrix_chunks=args.imatrix_chunks,
                                 verify_kwargs={"hf_dtype": args.hf_dtype} if args.hf_dtype != "auto" else None)
            failed = None
        except VerificationError as exc:
            result = getattr(exc, "result", None)
            if result is None:
                raise
            failed = exc
    from care.artifacts import read_gguf_manifest

    notes = read_gguf_manifest(result.manifest_path)["notes"]  # every note the manifest keeps is shown
    if args.json:
        print(json.dumps({"files": {q: str(p) for q, p in result.files.items()},
                          "manifest": str(result.manifest_path), "fallback_tensors": result.fallback_tensors,
                          "notes": notes, "verified": None if result.verify_report is None
                          else result.verify_report["passed"], "imatrix": result.imatrix,
                          "imatrix_comparison": (result.verify_report or {}).get("imatrix")}, indent=2))
    else:
        err = _console(stderr=True)
        for note in notes:
            err.print(f"[yellow]note:[/yellow] {note}")
        console = _console()
        if result.verify_report is not None:
            print_verify_table(result.verify_report)
            for q, c in (result.verify_report.get("imatrix") or {}).items():
                w, wo = c["with"], c["without"]
                change = f" ({(c['kl_ratio'] - 1) * 100:+.0f}%)" if c["kl_ratio"] is not None else ""
                console.print(f"{q}: KL {w['kl_mean']:.3g} with the imatrix vs {wo['kl_mean']:.3g} without{change}, "
                              f"top-1 {w['top1_agreement']:.3f} vs {wo['top1_agreement']:.3f}")
        if result.imatrix:
            cal = result.imatrix["calibration"]
            console.print(f"imatrix: {result.imatrix['file']} ({result.imatrix['chunks']} chunks of "
                          f"{result.imatrix['n_ctx']} tokens; calibration {cal['source']}, {cal['tokens']} tokens, "
                          f"sha256 {cal['sha256'][:12]})")
        for q, p in result.files.items():
            console.print(f"{q:>7}  {p}  ({p.stat().st_size / 2**20:.1f} MiB)")
        console.print(f"manifest: {result.manifest_path}\nOllama:   ollama create {_ollama_name(result.name)} "
                      f"-f {result.modelfile_path}")
        if result.verify_report is None:
            err.print("[yellow]not verified (--no-verify)[/yellow]")
    if failed is not None:
        raise failed
    return 0


def run_gguf_lora(args: argparse.Namespace) -> int:
    from care.errors import VerificationError
    from care.export.lora import export_gguf_lora

    failed = None
    try:
        result = export_gguf_lora(args.adapter_dir, args.out, base=args.base, outtype=args.outtype,
                                  verify_base=args.verify_base, verify=not args.no_verify, name=args.name,
                                  n_threads=args.threads)
    except VerificationError as exc:
        result = getattr(exc, "result", None)
        if result is None:
            raise
        failed = exc
    from care.artifacts import read_lora_manifest

    manifest = read_lora_manifest(result.manifest_path)
    if args.json:
        print(json.dumps(manifest, indent=2))
    else:
        console = _console()
        for note in manifest["notes"]:  # every note the manifest keeps is shown
            _console(stderr=True).print(f"[yellow]note:[/yellow] {note}")
        if result.verify_report is not None:
            r = result.verify_report
            print_verify_table(r, title=f"{r['quant']} base + adapter vs merged {r['quant']}, both against the "
                               "peft-merged HF model")
            console.print(f"adapter effect: KL(base+adapter || base) {r['adapter_effect_kl']:.3g} "
                          f"(must be >= {r['adapter_min_kl']:g})")
        a, lora = manifest["adapter"], manifest["lora"]
        console.print(f"adapter: {result.adapter} ({a['size'] / 2**20:.2f} MiB, {a['type']}; r={lora['rank']}, "
                      f"alpha={lora['alpha']:g}{', rsLoRA' if lora['rslora'] else ''})")
        if result.base_gguf is not None:
            console.print(f"base:    {result.base_gguf} ({result.base_gguf.stat().st_size / 2**20:.1f} MiB)")
        console.print(f"manifest: {result.manifest_path}")
        if result.modelfile_path is not None:
            console.print(f"Ollama:   ollama create {_ollama_name(manifest['name'])} -f {result.modelfile_path}")
        if result.verify_report is None:
            _console(stderr=True).print("[yellow]not verified (--no-verify)[/yellow]")
    if failed is not None:
        raise failed
    return 0


def _ollama_name(name: str) -> str:
    import re

    return re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-") or "care-model"


def run_onnx(args: argparse.Namespace) -> int:
    from care.errors import VerificationError
    from care.export.onnx import export_onnx

    failed = None
    with _progress() as bar:
        task = bar.add_task(f"onnx {args.precision}", total=None)
        try:
            result = export_onnx(args.model_dir, args.out, precision=args.precision, verify=not args.no_verify,
                                 int4_algo=args.int4_algo, n_threads=args.threads)
        except VerificationError as exc:
            result = getattr(exc, "result", None)
            if result is None:
                raise
            failed = exc
        bar.update(task, completed=1, total=1)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        _print_onnx(result)
    if failed is not None:
        raise failed
    return 0


def _print_onnx(result) -> None:
    console = _console()
    if result.verify_report:
        r = result.verify_report
        console.print(f"ONNX {result.precision} ({result.int4_algo or '-'}): top-1 {r['top1_agreement']:.3f}, "
                      f"KL {r['kl_mean']:.3g} (limit {r['kl_limit']:g}), ppl {r['ppl']:.2f} vs HF "
                      f"{r['ppl_hf']:.2f}; reply: {r.get('reply', '')[:80]!r}")
    console.print(f"folder: {result.out_dir} ({result.size_bytes / 2**20:.1f} MiB)\nmanifest: {result.manifest_path}")


def run_verify(args: argparse.Namespace) -> int:
    from care.export.verify import verify_gguf

    report = verify_gguf(args.file, args.source, n_ctx=args.n_ctx, n_threads=args.threads, fail=False,
                         hf_dtype=args.hf_dtype)
    if args.report:
        from care.io import write_json

        write_json(Path(args.report), report)
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        print_verify_table(report, title=f"{Path(args.file).name} vs {args.source}")
    if not report["passed"]:
        from care.errors import VerificationError

        raise VerificationError("Verification failed: " + "; ".join(report["failures"][:3]), path=args.file,
                                hint="Re-export the file with `care export gguf`")
    return 0


def run_setup(args: argparse.Namespace) -> int:
    if args.tools is not None:
        import os

        from care.toolchain.llamacpp import SDIST_ENV, build_tools

        if args.sdist:
            os.environ[SDIST_ENV] = args.sdist
        names = args.tools or ["llama-server"]
        print(f"Building {', '.join(names)} from llama.cpp's source in the llama-cpp-python sdist "
              "(cached; the first build takes minutes)...", file=sys.stderr)
        for name, path in build_tools(names, force=args.force).items():
            print(f"{name} ready: {path}")
        return 0
    from care.toolchain.llamacpp.converter_setup import setup_converter

    print("Fetching llama.cpp's converter for the installed llama-cpp-python (pip download, ~75 MB)...",
          file=sys.stderr)
    path = setup_converter(force=args.force, sdist=args.sdist)
    print(f"llama.cpp converter ready: {path}")
    return 0
