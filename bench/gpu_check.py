"""The Python stages of bench/gpu_check.sh (one lent GPU, one script). Each stage writes WORK/<stage>.json;
`collect` joins them (and the failed stage, if any) into one JSON with the targets checked.

    python bench/gpu_check.py model   --work W [--layers 32 | --smoke]
    python bench/gpu_check.py train   --work W [--steps 30 --batch 4 --max-length 1024]
    python bench/gpu_check.py compare --work W [--steps 20 --batch 4 --max-length 1024]
    python bench/gpu_check.py collect --work W --out FILE [--failed STAGE]

The model is bench/export.py's Phi-3.5-mini-shaped folder: Phi-3.5-mini's real dimensions (32 layers, hidden
3072, FFN 8192, 32 heads, vocab 32,064, LongRoPE) with random bf16 weights. Its tokenizer is the small
SentencePiece stand-in bench/export.py builds (Phi-3's special tokens and chat template); the real Phi-3
vocabulary exists offline only as llama.cpp's vocab GGUF, which the HF converter cannot take back. Shapes, and so
memory and speed, are Phi-3.5-mini's; the training rows are sized to fill max_length tokens, the worst case.
--smoke uses the 2-layer, 64-wide test Phi-3 instead, so every stage runs on a CPU in a few minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("CARE_NO_PROGRESS", "1")

TARGETS = {"peak_gpu_gb_max": 14.0, "throughput_ratio_min": 1.3}


def _write(work: Path, stage: str, data: dict[str, Any]) -> None:
    from care.io import write_json

    write_json(work / f"{stage}.json", data)


def stage_model(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work)
    t0 = time.perf_counter()
    if args.smoke:
        from test_export_gguf import build_sentencepiece_phi3

        folder = work / "tiny-phi3" / "phi3-base"
        if not (folder / "config.json").is_file():
            build_sentencepiece_phi3(work / "tiny-phi3")
        kind = "tiny Phi-3 (smoke: 2 layers, hidden 64)"
    else:
        from export import phi35_shaped  # bench/export.py

        folder = phi35_shaped(work, args.layers)
        kind = f"Phi-3.5-mini-shaped, {args.layers} layers, random bf16 weights"
    cfg = json.loads((folder / "config.json").read_text())
    return {"model_dir": str(folder), "kind": kind, "hidden_size": cfg["hidden_size"],
            "num_hidden_layers": cfg["num_hidden_layers"], "vocab_size": cfg["vocab_size"],
            "seconds": round(time.perf_counter() - t0, 1)}


def _sized_rows(tokenizer, n: int, max_length: int) -> list[dict[str, str]]:
    """n rows whose chat-formatted length is just under max_length tokens (over-length rows are dropped by the
    trainer's length filter, so they are sized, not truncated)."""
    from care.train.formatting import token_lengths
    from care.train.readers import Record

    words = ["the", "patient", "reports", "a", "mild", "headache", "and", "asks", "whether", "the", "card", "fee",
             "can", "be", "refunded", "today"]

    def row(k: int, i: int) -> Record:
        text = " ".join(words[(i + j) % len(words)] for j in range(k))
        return Record(id=str(i), query=f"Question {i}: {text[:200]}", response=text, domain="general")

    lo, hi = 1, max_length * 4
    while lo < hi:  # the most words that still fit (token_lengths counts the chat-formatted row)
        mid = (lo + hi + 1) // 2
        if token_lengths(tokenizer, [row(mid, 0)])[0] <= max_length - 8:
            lo = mid
        else:
            hi = mid - 1
    return [{"query": r.query, "response": r.response, "domain": "general"} for r in (row(lo, i) for i in range(n))]


def stage_train(args: argparse.Namespace) -> dict[str, Any]:
    """recipes/care.yaml (QLoRA NF4, r=8, alpha=32, dropout 0.05, paged 8-bit AdamW) on the shaped model for
    --steps steps at batch x max_length, grad_accum 1 and no evaluation so the run is --steps optimizer steps."""
    import torch

    from care.train.config import load_recipe
    from care.train.modeling import load_tokenizer, precision
    from care.train.sft import train

    work = Path(args.work)
    model = json.loads((work / "model.json").read_text())["model_dir"]
    data = work / "train_rows.jsonl"
    rows = _sized_rows(load_tokenizer(model), args.steps * args.batch, args.max_length)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    sets = [f"model.base={model}", f"data.sources=[{{path: {data}}}]", "data.val_fraction=0.0",
            "data.balance=none", "data.dedupe=false", f"training.max_steps={args.steps}",
            f"training.batch={args.batch}", f"training.max_length={args.max_length}", "training.grad_accum=1",
            "training.logging_steps=1", f"training.save_steps={args.steps}", "training.warmup=0"]
    if args.gradient_checkpointing:  # the recipe has it off; on if the 14 GB target is missed without it
        sets.append("training.gradient_checkpointing=true")
    if not torch.cuda.is_available():
        sets.append("training.optim=adamw_torch")  # bitsandbytes' paged 8-bit optimizers need a GPU
    recipe = load_recipe(REPO / "recipes" / "care.yaml", overrides=sets)
    prec = precision(recipe.quant.get("compute_dtype", "auto"))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    out = work / "run"
    t0 = time.perf_counter()
    res = train(recipe, out)
    wall = time.perf_counter() - t0
    from train_throughput import _steady_tokens_per_s

    result: dict[str, Any] = {
        "steps": res.metrics["global_step"], "batch": args.batch, "max_length": args.max_length,
        "lora": {k: recipe.lora[k] for k in ("r", "alpha", "dropout")}, "quant": recipe.quant,
        "optim": recipe.training["optim"], "precision": prec.to_dict(),
        "gradient_checkpointing": bool(recipe.training.get("gradient_checkpointing")),
        "mixed_precision": res.metrics.get("mixed_precision"),
        "tokens_per_s": round(_steady_tokens_per_s(out / "metrics.jsonl"), 1),
        "first_loss": res.metrics.get("first_loss"), "last_loss": res.metrics.get("last_loss"),
        "wall_s": round(wall, 1), "adapter": str(res.adapter_dir),
    }
    if torch.cuda.is_available():
        result["peak_gpu_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        result["peak_gpu_reserved_gb"] = round(torch.cuda.max_memory_reserved() / 1e9, 2)
        result["gpu"] = torch.cuda.get_device_name(0)
    return result


def stage_compare(args: argparse.Namespace) -> dict[str, Any]:
    """bench/train_throughput.py: ours (QLoRA + packing) against plain transformers + peft padded to max length."""
    work = Path(args.work)
    model = json.loads((work / "model.json").read_text())["model_dir"]
    cmd = [sys.executable, str(REPO / "bench" / "train_throughput.py"), "--model", model, "--steps", str(args.steps),
           "--batch", str(args.batch), "--max-length", str(args.max_length), "--configs", "qlora+packing,baseline"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"PYTHONPATH": str(REPO)})
    (work / "compare.log").write_text(proc.stdout + "\n" + proc.stderr)
    last = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode != 0 or not last:
        raise SystemExit(f"train_throughput.py failed (exit {proc.returncode}); see {work / 'compare.log'}")
    data = json.loads(last[-1])
    results = data["results"]
    if "qlora+packing" not in results or "baseline" not in results:
        raise SystemExit(f"train_throughput.py did not measure both configs; see {work / 'compare.log'}")
    ours, base = results["qlora+packing"], results["baseline"]
    return {"ours": ours, "baseline": base, "ratio": round(ours["tokens_per_s"] / base["tokens_per_s"], 3),
            "steps": args.steps, "batch": args.batch, "max_length": args.max_length, "device": data["device"]}


def collect(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work)
    out: dict[str, Any] = {"failed_stage": args.failed, "stages": {}}
    for stage in ("doctor", "model", "train", "compare", "merge", "export"):
        f = work / f"{stage}.json"
        if f.is_file():
            try:
                out["stages"][stage] = json.loads(f.read_text())
            except ValueError:
                out["stages"][stage] = {"unreadable": str(f)}
    verify = work / "gguf" / "verify.json"  # the export's per-type figures (KL, top-1, perplexity, stop token)
    if "export" in out["stages"] and verify.is_file():
        out["stages"]["export"]["verify"] = json.loads(verify.read_text())
    times = work / "times.tsv"
    if times.is_file():
        out["stage_seconds"] = {ln.split("\t")[0]: float(ln.split("\t")[1]) for ln in times.read_text().splitlines()
                                if "\t" in ln}
    train_res, cmp = out["stages"].get("train", {}), out["stages"].get("compare", {})
    checks: dict[str, Any] = {}
    if "peak_gpu_reserved_gb" in train_res:
        checks["peak_gpu_gb"] = {"value": train_res["peak_gpu_reserved_gb"], "max": TARGETS["peak_gpu_gb_max"],
                                 "met": train_res["peak_gpu_reserved_gb"] <= TARGETS["peak_gpu_gb_max"]}
    if "ratio" in cmp:
        checks["throughput_vs_baseline"] = {"value": cmp["ratio"], "min": TARGETS["throughput_ratio_min"],
                                            "met": cmp["ratio"] >= TARGETS["throughput_ratio_min"],
                                            "device": cmp.get("device")}
    out["targets"] = checks
    Path(args.out).write_text(json.dumps(out, indent=2, default=str))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stage", choices=("model", "train", "compare", "collect"))
    p.add_argument("--work", required=True)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--failed", default=None)
    args = p.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    if args.stage == "collect":
        res = collect(args)
        print(json.dumps(res.get("targets", {})))
        return 0
    fn = {"model": stage_model, "train": stage_train, "compare": stage_compare}[args.stage]
    result = fn(args)
    _write(Path(args.work), args.stage, result)
    print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
