"""The phone quant type, chosen by measured KL: Q4_K_M, IQ4_XS and Q3_K_M, each with and without a
domain-calibrated importance matrix, on the embedded SmolLM2-135M; then the chosen type's file size and peak
RSS under the phone profile on the Phi-3.5-mini-shaped model.

Part 1 (~6 min on 2 cores at 1 thread): SmolLM2-135M-Instruct as an HF folder (dequantized from the embedded
GGUF, the tests' cached copy), exported by `care export gguf --imatrix` (care.export.gguf) to f16, Q4_K_M,
IQ4_XS and Q3_K_M. The matrix is computed by llama.cpp's llama-imatrix on the shipped medical/banking/telecom
sample exchanges (care/data/samples/*.jsonl) minus a held-out fifth per domain; verification measures KL(HF
|| GGUF) and top-1 agreement on those held-out exchanges (rendered with the model's chat template and the
domain system prompts) plus the verifier's own held-out texts. SmolLM2's 576-wide rows do not fit the
256-wide blocks of the k-quants and IQ4_XS, so most of its matrices fall back to 32-block types: the counts
are printed, because they make the small model's ranking of the 256-block types only partly informative.

Part 2 (--phi35, ~15 min; ~8 GB of temporary disk): the Phi-3.5-mini-shaped model (random weights, real
shapes and vocabulary: bench/phone_profile.py writes its f16 GGUF), quantized to the chosen type with an
importance matrix (2 chunks: random weights make the matrix, and KL, meaningless; only the file's tensor
layout, size and memory matter), then measured under the phone profile at n_ctx 4096 (peak RSS, decode) in a
child process like `care bench --profile phone`. Target: peak RSS <= 2.7 GB.

    .venv/bin/python bench/phone_quant.py [--threads 1] [--phi35] [--out phone_quant.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TYPES = ("q4_k_m", "iq4_xs", "q3_k_m")
PHONE_TARGET_GB = 2.7


def split_samples(work: Path, tokenizer, val_fraction: float = 0.2) -> tuple[Path, tuple[str, ...], dict]:
    """Calibration rows (a .jsonl) and held-out texts (rendered conversations) from the shipped samples."""
    from care.export.verify import EVAL_TEXTS
    from care.pipeline import SAMPLE_DOMAINS, sample_file
    from care.train.data import split_stratified
    from care.train.formatting import to_messages
    from care.train.readers import BadRows, read_source

    records = [r for d in SAMPLE_DOMAINS for r in read_source(sample_file(d), None, BadRows(strict=True))]
    train, val = split_stratified(records, val_fraction, seed=42)
    calib = work / "calibration.jsonl"
    calib.write_text("".join(json.dumps({"query": r.query, "response": r.response, "domain": r.domain}) + "\n"
                             for r in train), encoding="utf-8")
    held_out = tuple(tokenizer.apply_chat_template(to_messages(r), tokenize=False) for r in val)
    return calib, held_out + EVAL_TEXTS, {"calibration_rows": len(train), "held_out_rows": len(val),
                                          "held_out_texts": len(held_out) + len(EVAL_TEXTS)}


def part1(threads: int, work: Path) -> dict:
    from export import smollm_hf  # bench/export.py: the same cached HF folder the tests build

    from care.export.gguf import PLAIN_SUFFIX, export_gguf
    from care.export.hf_source import hf_tokenizer

    hf = smollm_hf(work)
    calib, texts, split = split_samples(work, hf_tokenizer(hf))
    t0 = time.perf_counter()
    result = export_gguf(hf, work / "gguf", quants=("f16", *TYPES), n_threads=threads, name="SmolLM2-135M-Instruct",
                         imatrix=True, calibration=calib, verify_kwargs={"texts": texts})
    seconds = time.perf_counter() - t0
    report = result.verify_report
    assert report is not None
    rows = []
    for q in TYPES:
        for label, with_imatrix in ((q, True), (q + PLAIN_SUFFIX, False)):
            e = report["files"][label]
            rows.append({"type": q, "imatrix": with_imatrix, "kl_mean": e["kl_mean"], "kl_p99": e["kl_p99"],
                         "top1": e["top1_agreement"], "ppl": e["ppl"], "ppl_hf": e["ppl_hf"],
                         "file_mb": e["file_bytes"] / 1e6, "fallback": result.fallback_tensors[q],
                         "tensors": result.total_tensors[q], "tensor_types": e["tensor_types"]})
    f16 = report["files"]["f16"]
    return {"model": "SmolLM2-135M-Instruct", "threads": threads, "eval_tokens": report["eval_tokens"], **split,
            "imatrix": result.imatrix, "f16_mb": f16["file_bytes"] / 1e6, "f16_kl": f16["kl_mean"],
            "rows": rows, "notes": result.notes, "seconds": round(seconds, 1)}


def choose(rows: list[dict]) -> dict:
    """The phone type: of the two types smaller than Q4_K_M, the one with the lower KL with the imatrix.

    Both are made with the imatrix (it lowers KL for every type here, at no cost on the device)."""
    smaller = [r for r in rows if r["imatrix"] and r["type"] != "q4_k_m"]
    best = min(smaller, key=lambda r: r["kl_mean"])
    return {"type": best["type"], "imatrix": True, "kl_mean": best["kl_mean"], "file_mb": best["file_mb"]}


def part2(quant: str, threads: int, work: Path) -> dict:
    from phone_profile import write_phi35_shaped_f16

    from care.export.imatrix import Calibration, compute_imatrix, imatrix_tools
    from care.export.quantize import quantize_with_tool
    from care.paths import cache_dir
    from care.runtime.bench import BenchConfig, run_isolated
    from care.runtime.profiles import PROFILES

    dst = cache_dir() / "bench" / f"phi35-shaped.{quant.upper()}.imatrix.gguf"
    built = {}
    if not dst.is_file():
        tools = imatrix_tools()
        f16 = write_phi35_shaped_f16(work / "phi35-shaped.f16.gguf")
        try:
            # 2 chunks of 64 tokens: enough for llama.cpp to take its imatrix code path (tensor types and
            # sizes as a real export), cheap on a 3.8B model; random weights make its values meaningless.
            text = " ".join(f"The customer asked about card {i} and the agent answered." for i in range(40))
            t0 = time.perf_counter()
            imx = compute_imatrix(f16, Calibration(text=text, source="bench", rows=0, tokens=128),
                                  work / "phi35.imatrix", tool=tools["llama-imatrix"], n_threads=threads,
                                  chunks=2, n_ctx=64)
            built["imatrix_s"] = round(time.perf_counter() - t0, 1)
            t0 = time.perf_counter()
            quantize_with_tool(f16, {quant: dst}, tools["llama-quantize"], imx.path, n_threads=threads)
            built["quantize_s"] = round(time.perf_counter() - t0, 1)
        finally:
            f16.unlink(missing_ok=True)
    phone = PROFILES["phone"]

    def measure(path: Path) -> dict:
        cfg = BenchConfig(model=str(path), n_ctx=phone["n_ctx"], threads=phone["threads"], type_k=phone["type_k"],
                          type_v=phone["type_v"], flash_attn=phone["flash_attn"], repack=phone["repack"],
                          use_mmap=phone["use_mmap"], prompt_tokens=64, gen_tokens=32)
        res = run_isolated(cfg, ceiling_gb=phone["ceiling_gb"])
        return {"file": path.name, "file_gb": path.stat().st_size / 1e9, "peak_rss_gb": res.get("peak_rss_gb"),
                "decode_tok_s": res.get("decode_tok_s"), "error": res.get("error")}

    out = {"n_ctx": phone["n_ctx"], "threads": phone["threads"], "target_gb": PHONE_TARGET_GB, **built,
           "chosen": measure(dst)}
    # The Q4_K_M phone_profile.py built (today's default), measured in the same run under the same load.
    q4 = cache_dir() / "bench" / "phi35-shaped.Q4_K_M.gguf"
    if q4.is_file() and quant != "q4_k_m":
        out["q4_k_m"] = measure(q4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=int(os.environ.get("CARE_THREADS", "1")))
    ap.add_argument("--phi35", action="store_true", help="also measure the chosen type on the Phi-3.5-shaped model")
    ap.add_argument("--skip-smollm", action="store_true", help="--phi35 only, for the type given by --type")
    ap.add_argument("--type", default=None, help="with --skip-smollm: the type to measure on Phi-3.5-shaped")
    ap.add_argument("--out", default=None, help="also write the figures to this JSON file")
    ap.add_argument("--work", default=None, help="work folder (default: a temp folder, removed after)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="care-phone-quant-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        out: dict = {}
        if not args.skip_smollm:
            out["smollm"] = p1 = part1(args.threads, work)
            imx = p1["imatrix"]
            print(f"\n{p1['model']}: importance matrix on {imx['calibration']['rows']} sample exchanges "
                  f"({imx['calibration']['tokens']} tokens, {imx['chunks']} chunks of {imx['n_ctx']}); verified on "
                  f"{p1['held_out_rows']} held-out exchanges + {p1['held_out_texts'] - p1['held_out_rows']} texts "
                  f"({p1['eval_tokens']} tokens); f16 {p1['f16_mb']:.0f} MB, KL {p1['f16_kl']:.1e}; {p1['seconds']:.0f} s")
            print("| type | imatrix | KL mean | KL p99 | top-1 | ppl (HF) | file MB | fallback tensors |")
            print("|---|---|---|---|---|---|---|---|")
            for r in p1["rows"]:
                print(f"| {r['type'].upper()} | {'yes' if r['imatrix'] else 'no'} | {r['kl_mean']:.4f} | "
                      f"{r['kl_p99']:.3f} | {r['top1']:.3f} | {r['ppl']:.2f} ({r['ppl_hf']:.2f}) | {r['file_mb']:.1f} | "
                      f"{r['fallback']}/{r['tensors']} |")
            for q in TYPES:
                w, wo = (next(r for r in p1["rows"] if r["type"] == q and r["imatrix"] is i) for i in (True, False))
                print(f"{q.upper()}: the imatrix changes KL by {(w['kl_mean'] / wo['kl_mean'] - 1) * 100:+.0f}% "
                      f"(top-1 {wo['top1']:.3f} -> {w['top1']:.3f})")
            for note in p1["notes"]:
                print(f"note: {note}")
            out["choice"] = choice = choose(p1["rows"])
            print(f"phone type: {choice['type'].upper()} with the imatrix (KL {choice['kl_mean']:.4f}, "
                  f"{choice['file_mb']:.1f} MB)")
        quant = args.type or out.get("choice", {}).get("type")
        if args.phi35:
            if not quant:
                ap.error("--skip-smollm needs --type")
            out["phi35"] = p2 = part2(quant, args.threads, work)
            print(f"\nPhi-3.5-mini-shaped (random weights: KL means nothing here, only size and memory), phone "
                  f"profile, n_ctx {p2['n_ctx']}, {p2['threads']} threads (target peak RSS <= {p2['target_gb']} GB):")
            for r in (p2["chosen"], p2.get("q4_k_m")):
                if r:
                    print(f"  {r['file']}: {r['file_gb']:.2f} GB file, peak RSS {r['peak_rss_gb']:.2f} GB, decode "
                          f"{r['decode_tok_s']:.2f} tok/s" + (f"; error: {r['error']}" if r.get("error") else ""))
        if args.out:
            Path(args.out).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
