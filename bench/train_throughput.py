"""Training throughput: tokens/s and peak RSS of QLoRA vs plain LoRA, packing on vs off, and (on a GPU) our
settings vs a plain transformers Trainer + PEFT baseline padded to max length.

Each configuration runs in its own process, so peak RSS (ru_maxrss) is that configuration's alone.
Tokens/s counts real (non-pad) tokens per second over the steps after the first (warm-up) step.

    .venv/bin/python bench/train_throughput.py                       # embedded SmolLM2, CPU-sized defaults
    .venv/bin/python bench/train_throughput.py --model PATH --steps 20 --batch 8 --max-length 512
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CONFIGS = {
    "lora": {"quant": False, "packing": False},
    "qlora": {"quant": True, "packing": False},
    "qlora+packing": {"quant": True, "packing": True},
    "lora+packing": {"quant": False, "packing": True},
}


def _rows(n: int) -> list[dict]:
    from care.paths import shared_data_dir

    shared = shared_data_dir()
    if shared is not None:
        from care.train.readers import BadRows, read_source

        bitext = next((shared / "bitext_customer_support").glob("*.csv"))
        recs = read_source(bitext, "bitext", BadRows(), limit=n, options={"placeholders": "strip"})
        return [{"query": r.query, "response": r.response, "domain": "general"} for r in recs]
    # Varied lengths so padding matters, as in real data.
    return [{"query": f"Question {i}: " + "how do I reset my card? " * (1 + i % 5),
             "response": "Open the app, go to Cards, tap Reset. " * (1 + (i * 7) % 9), "domain": "general"}
            for i in range(n)]


def _recipe(args, tmp: Path, packing: bool):
    from care.train.config import recipe_from_dict

    data = tmp / "bench.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows(args.steps * args.batch)), encoding="utf-8")
    return recipe_from_dict({
        "name": "bench", "model": {"base": args.model},
        "data": {"sources": [{"path": str(data)}], "val_fraction": 0.0, "balance": "none", "dedupe": False},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "training": {"max_steps": args.steps, "batch": args.batch, "max_length": args.max_length,
                     "logging_steps": 1, "save_steps": 10**6, "packing": packing, "warmup": 0, "lr": 1e-4},
    })


def _steady_tokens_per_s(metrics: Path) -> float:
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if '"loss"' in x]
    rows = [r for r in rows if "tokens_per_s" in r]
    return sum(r["tokens_per_s"] for r in rows) / len(rows) if rows else float("nan")


def worker_ours(args, name: str) -> dict:
    from care.train.sft import train

    cfg = CONFIGS[name]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = train(_recipe(args, Path(tmp), cfg["packing"]), Path(tmp) / "run", no_quant=not cfg["quant"])
        wall = time.perf_counter() - t0
        tps = _steady_tokens_per_s(Path(tmp) / "run" / "metrics.jsonl")
    return {"config": name, "tokens_per_s": tps, "wall_s": wall, "steps": res.metrics["global_step"]}


def worker_baseline(args) -> dict:
    """Plain transformers Trainer + PEFT LoRA, batches padded to max_length, no packing."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from care.train.formatting import to_messages
    from care.train.modeling import compute_dtype, load_tokenizer, precision, resolve_base
    from care.train.readers import Record

    base = resolve_base({"base": args.model})
    tok = load_tokenizer(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=compute_dtype("auto"))
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    feats = []
    for r in _rows(args.steps * args.batch):
        text = tok.apply_chat_template(to_messages(Record(id="", **r)), tokenize=False)
        enc = tok(text, truncation=True, max_length=args.max_length, padding="max_length")
        labels = [t if m else -100 for t, m in zip(enc["input_ids"], enc["attention_mask"], strict=True)]
        feats.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})
    real = sum(sum(f["attention_mask"]) for f in feats)
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            times.append(time.perf_counter())

    on_cpu = not torch.cuda.is_available()
    prec = precision("auto")
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(output_dir=tmp, per_device_train_batch_size=args.batch, max_steps=args.steps,
                                  learning_rate=1e-4, report_to="none", save_strategy="no", use_cpu=on_cpu,
                                  bf16=prec.bf16, fp16=prec.fp16,  # the rule ours uses (care/train/precision.py)
                                  logging_steps=10**6, disable_tqdm=True)
        from datasets import Dataset

        t0 = time.perf_counter()
        Trainer(model=model, args=targs, train_dataset=Dataset.from_list(feats), callbacks=[Clock()]).train()
        wall = time.perf_counter() - t0
    per_step = real / args.steps
    steady = (times[-1] - times[0]) / max(len(times) - 1, 1) if len(times) > 1 else wall
    return {"config": "hf+peft baseline (padded)", "tokens_per_s": per_step / steady, "wall_s": wall,
            "steps": args.steps}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-length", type=int, default=384)
    p.add_argument("--configs", default=None, help="comma list of: " + ", ".join(CONFIGS))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("CARE_NO_PROGRESS", "1")
    if args.worker:
        import torch

        torch.set_num_threads(int(os.environ.get("CARE_THREADS", torch.get_num_threads())))
        out = worker_baseline(args) if args.worker == "baseline" else worker_ours(args, args.worker)
        out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if torch.cuda.is_available():
            out["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
        print("RESULT " + json.dumps(out))
        return 0
    import torch

    names = args.configs.split(",") if args.configs else list(CONFIGS)
    if torch.cuda.is_available() and not args.configs:
        names.append("baseline")
    results = {}
    for name in names:
        cmd = [sys.executable, __file__, "--worker", name, "--model", args.model, "--steps", str(args.steps),
               "--batch", str(args.batch), "--max-length", str(args.max_length)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"PYTHONPATH": str(REPO)})
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{name}: failed\n{proc.stderr[-1500:]}")
            continue
        results[name] = json.loads(line[7:])
        r = results[name]
        print(f"{name:<28} {r['tokens_per_s']:9.1f} tok/s   peak RSS {r['peak_rss_mib']:7.0f} MiB"
              + (f"   peak GPU {r['peak_gpu_mib']:7.0f} MiB" if "peak_gpu_mib" in r else "")
              + f"   ({r['steps']} steps, {r['wall_s']:.1f} s)", flush=True)

    def ratio(a: str, b: str, what: str) -> None:
        if a in results and b in results:
            ra, rb = results[a], results[b]
            print(f"{what}: tokens/s x{ra['tokens_per_s'] / rb['tokens_per_s']:.2f}, "
                  f"peak RSS x{ra['peak_rss_mib'] / rb['peak_rss_mib']:.2f}")

    ratio("qlora", "lora", "QLoRA vs LoRA")
    ratio("qlora+packing", "qlora", "packing on vs off (QLoRA)")
    ratio("lora+packing", "lora", "packing on vs off (LoRA)")
    ratio("qlora+packing", "baseline", "ours (QLoRA+packing) vs HF+PEFT baseline (goal >= 1.3)")
    ratio("lora+packing", "baseline", "ours (LoRA+packing) vs HF+PEFT baseline (goal >= 1.3)")
    print(json.dumps({"device": "cuda" if torch.cuda.is_available() else "cpu", "args": vars(args),
                      "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
