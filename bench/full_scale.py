"""Every stage at Phi-3.5-mini's real size on this CPU: QLoRA -> merge -> GGUF q4_k_m + verification -> chat.

The model is Phi-3.5-mini-shaped (bench/phi35_shaped.py: the real config and 32,064-token vocabulary, 3.82 B
random bf16 weights, 7.6 GB). The weights are random, so loss, KL and replies say nothing about quality:
this measures memory and time. Each stage runs as its own `care` command in its own process; its peak RSS
is the kernel's high-water mark for that process tree (os.wait4), and the children of the export stage
(llama.cpp's converter, the quantizer, the verify worker) are also sampled every 0.2 s by their command
line, so the converter's own peak can be set against the target.

Stages and targets (issue 15):
  build    the HF folder (once; reused later)
  train    `care train`: QLoRA NF4, r=8, all linear layers, gradient checkpointing, batch 1 x 512, 2 steps
           -> peak <= 8 GB
  merge    `care merge` into the 16-bit base -> peak <= 1.3x the f16 size
  export   `care export gguf --f16 --q4_k_m` with verification -> converter peak <= 1.2x the f16 size
  verify32 `care export verify` of the f16 file against an fp32 HF reference (the exact check)
  chat     `care chat --once --profile phone`

    nice -n 15 .venv/bin/python bench/full_scale.py --work .cache/full_scale [--threads 2] [--only train,merge]

Needs ~25 GB of disk in --work (base 7.6 GB, merged 7.6 GB, F16 GGUF 7.6 GB while quantizing, Q4_K_M 2.4 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

TARGETS = {"train": ("peak <= 8 GB", lambda peak, f16: peak <= 8e9),
           "merge": ("peak <= 1.3x f16", lambda peak, f16: peak <= 1.3 * f16),
           "converter": ("peak <= 1.2x f16", lambda peak, f16: peak <= 1.2 * f16)}
# Child processes of the export stage, told apart by their command line.
CHILD_KINDS = (("converter", "convert"), ("quantizer", "quantize"), ("verify worker", "verify"))


def _sampler(pid: int, peaks: dict[str, int], stop: threading.Event) -> None:
    """Peak RSS of each descendant kind, sampled every 0.2 s (short spikes can be missed: the stage's own
    figure comes from wait4, which cannot miss)."""
    import psutil

    try:
        root = psutil.Process(pid)
    except psutil.Error:
        return
    while not stop.is_set():
        try:
            kids = root.children(recursive=True)
            # The stage's own process, split into anonymous memory and mapped file pages (the latter are
            # clean page cache the kernel can drop; RSS counts both).
            mem = root.memory_full_info()
            peaks["main anon"] = max(peaks.get("main anon", 0), mem.rss - mem.shared)
            peaks["main file-backed"] = max(peaks.get("main file-backed", 0), mem.shared)
        except psutil.Error:
            break
        for k in kids:
            try:
                cmd = " ".join(k.cmdline())
                rss = k.memory_info().rss
            except psutil.Error:
                continue
            kind = next((name for name, key in CHILD_KINDS if key in cmd), "other child")
            peaks[kind] = max(peaks.get(kind, 0), rss)
        stop.wait(0.2)


def run_stage(name: str, cmd: list[str], env: dict[str, str], log_dir: Path) -> dict:
    log_path = log_dir / f"{name}.log"
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        peaks: dict[str, int] = {}
        stop = threading.Event()
        th = threading.Thread(target=_sampler, args=(proc.pid, peaks, stop), daemon=True)
        th.start()
        _, status, usage = os.wait4(proc.pid, 0)
        stop.set()
        th.join()
    elapsed = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    row = {"stage": name, "rc": rc, "seconds": round(elapsed, 1),
           "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 3),  # ru_maxrss is in KiB on Linux
           "children_peak_gb": {k: round(v / 1e9, 3) for k, v in peaks.items()}, "log": str(log_path)}
    tail = log_path.read_text(errors="replace").splitlines()[-6:]
    print(f"    rc {rc}, {elapsed:.0f} s, peak RSS {row['peak_rss_gb']:.2f} GB {row['children_peak_gb']}", flush=True)
    if rc != 0:
        print("    " + "\n    ".join(tail), flush=True)
    return row


def _care_lengths(tok, path: Path) -> list[int]:
    """Token lengths of the rows in `path` as `care train` counts them (its length filter's own rule)."""
    from care.train.config import recipe_from_dict
    from care.train.data import build_data
    from care.train.formatting import token_lengths

    r = recipe_from_dict({"data": {"sources": [{"path": str(path)}], "val_fraction": 0, "balance": "none"}})
    return token_lengths(tok, build_data(r.data, resolve=r.resolve_path).stages[0].train)


def training_rows(model_dir: Path, path: Path, n: int = 8, tokens: int = 500, limit: int = 512) -> Path:
    """Support-style rows whose training sequence is ~`tokens` long (within the 512 limit, so none is
    dropped): batch 1 x 512 means sequences that long, not the samples' short replies."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    rows = _draft_rows(tok, n, tokens)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    over = max(_care_lengths(tok, path)) - tokens  # care adds what a bare chat rendering lacks (system prompt)
    if over > 0:
        rows = _draft_rows(tok, n, tokens - over)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    lengths = _care_lengths(tok, path)
    print(f"training rows: {lengths} tokens (limit {limit})", flush=True)
    if max(lengths) > limit:
        raise SystemExit(f"training rows are over {limit} tokens: {lengths}")
    return path


def _draft_rows(tok, n: int, tokens: int) -> list[dict[str, str]]:
    sentences = [json.loads(line)["response"] for line in
                 (REPO / "care/data/samples/medical.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = []
    for i in range(n):
        query = f"Question {i}: what should I do about these symptoms?"
        words = " ".join(sentences[(i + j) % len(sentences)] for j in range(40)).split()
        lo, hi = 1, len(words)
        while lo < hi:  # the longest reply whose rendered conversation fits `tokens`
            mid = (lo + hi + 1) // 2
            msgs = [{"role": "user", "content": query}, {"role": "assistant", "content": " ".join(words[:mid])}]
            if len(tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]) <= tokens:
                lo = mid
            else:
                hi = mid - 1
        rows.append({"query": query, "response": " ".join(words[:lo]), "domain": "medical"})
    return rows


def verify_summary(path: Path) -> dict:
    """Per file: passed, KL, top-1 and failures; plus whether every failure is a quant's KL limit, which on
    random weights is expected (limits are set for trained models) while every structural check passes."""
    if not path.is_file():
        return {"error": f"no {path.name}"}
    report = json.loads(path.read_text(encoding="utf-8"))
    files = {q: {"passed": r.get("passed"), "kl_mean": r.get("kl_mean"), "top1": r.get("top1_agreement"),
                 "failures": r.get("failures", [])} for q, r in report.get("files", {}).items()}
    kl_only = all(f.startswith("mean KL") for r in files.values() for f in r["failures"])
    exact = [q for q, r in files.items() if q in ("f16", "bf16", "f32") and r["passed"]]
    return {"files": files, "float_file_passed": exact, "only_quant_kl_failed": kl_only}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(REPO / ".cache" / "full_scale"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default="build,train,merge,export,verify32,chat")
    ap.add_argument("--out", default=None, help="JSON results (default: WORK/full_scale.json)")
    ap.add_argument("--export-from", choices=("merged", "base"), default="merged",
                    help="export the merged model (default) or the base folder (same shape and size)")
    args = ap.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    only = args.only.split(",")
    env = dict(os.environ, CARE_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads),
               MKL_NUM_THREADS=str(args.threads), CARE_NO_PROGRESS="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    py = [sys.executable]
    base, run, merged, gguf = work / "phi35-shaped-hf", work / "run", work / "merged", work / "gguf"
    results_path = Path(args.out) if args.out else work / "full_scale.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    stages = results.setdefault("stages", {})

    def save() -> None:
        results_path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")

    free = shutil.disk_usage(work).free
    print(f"work {work}: {free / 1e9:.1f} GB free", flush=True)
    if "build" in only:
        stages["build"] = run_stage("build", py + [str(REPO / "bench" / "phi35_shaped.py"), str(base)], env, work)
        save()
    f16 = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    results["f16_bytes"] = f16
    print(f"f16 (bf16) weights: {f16 / 1e9:.2f} GB", flush=True)
    if "train" in only:
        data = training_rows(base, work / "rows.jsonl")
        recipe = work / "full_scale.yaml"
        import yaml

        recipe.write_text(yaml.safe_dump({
            "name": "full-scale",
            "model": {"base": str(base)},
            "data": {"sources": [{"path": str(data), "domain": "medical"}], "val_fraction": 0,
                     "balance": "none"},
            "lora": {"r": 8, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
            "quant": {"load_in_4bit": True, "quant_type": "nf4", "double_quant": True},
            "training": {"max_steps": 2, "batch": 1, "grad_accum": 1, "max_length": 512,
                         "gradient_checkpointing": True, "logging_steps": 1, "save_steps": 2, "warmup": 0},
        }, sort_keys=False))
        shutil.rmtree(run, ignore_errors=True)
        stages["train"] = run_stage("train", py + ["-m", "care", "train", str(recipe), "--out", str(run)], env, work)
        save()
    if "merge" in only:
        stages["merge"] = run_stage("merge", py + ["-m", "care", "merge", str(run / "adapter"), "--out",
                                                   str(merged)], env, work)
        save()
    if "export" in only:
        source = merged if args.export_from == "merged" else base
        # f16 too: on random weights only the f16 file's near-exact check (top-1 >= 0.98, no position above
        # 2e-3 KL) can prove the conversion; a quant's KL limits are set for trained models (see verify_summary).
        stages["export"] = run_stage("export", py + ["-m", "care", "export", "gguf", str(source), "--out",
                                                     str(gguf), "--f16", "--q4_k_m", "--threads",
                                                     str(args.threads)], env, work)
        stages["export"]["verify"] = verify_summary(gguf / "verify.json")
        print(f"    verify: {json.dumps(stages['export']['verify'])}", flush=True)
        save()
    if "verify32" in only:
        # The export's own check used the bf16 checkpoint as its reference (1x the model in RAM); here the f16
        # file against an fp32 reference (2x: 15.3 GB), the only reference exact enough for f16's limits.
        f16_file = next(iter(sorted(gguf.glob("*-f16.gguf"))), gguf / "missing-f16.gguf")
        source = merged if args.export_from == "merged" else base
        stages["verify32"] = run_stage("verify32", py + ["-m", "care", "export", "verify", str(f16_file), "--source",
                                                         str(source), "--hf-dtype", "float32", "--threads",
                                                         str(args.threads), "--report",
                                                         str(gguf / "verify_f16_fp32.json")], env, work)
        stages["verify32"]["verify"] = {k: v for k, v in json.loads(
            (gguf / "verify_f16_fp32.json").read_text()).get("files", {}).get("f16", {}).items()
            if k in ("passed", "kl_mean", "kl_max", "top1_agreement", "failures")} \
            if (gguf / "verify_f16_fp32.json").is_file() else {}
        print(f"    verify f16 vs fp32: {json.dumps(stages['verify32']['verify'])}", flush=True)
        save()
    if "chat" in only:
        model = next(iter(sorted(gguf.glob("*q4_k_m*.gguf"))), gguf)
        stages["chat"] = run_stage("chat", py + ["-m", "care", "chat", "--model", str(model), "--profile", "phone",
                                                 "--once", "How should I treat a mild burn?", "--max-tokens",
                                                 "32", "--stats", "--domain", "general"], env, work)
        save()
    print("\n| stage | seconds | peak RSS GB | target | met |\n|---|---|---|---|---|")
    for name, row in stages.items():
        peaks = [(name, row["peak_rss_gb"])]
        peaks += [(f"{name}: {k}", v) for k, v in row.get("children_peak_gb", {}).items() if k != "other child"]
        for label, peak in peaks:
            key = "converter" if label.endswith("converter") else label
            target, ok = TARGETS.get(key, ("", None))
            # A stage is judged with its exit code; a child's own memory row by its peak alone.
            fine = ok is not None and ok(peak * 1e9, f16) and (row["rc"] == 0 or label != name)
            met = "" if ok is None else ("yes" if fine else "NO")
            if row["rc"] != 0 and label == name:
                met = f"FAILED (rc {row['rc']})"
            ratio = f" ({peak * 1e9 / f16:.2f}x f16)" if f16 else ""
            print(f"| {label} | {row['seconds'] if label == name else ''} | {peak:.2f}{ratio} | {target} | {met} |")
    save()
    print(f"saved {results_path}")
    return 0 if all(r["rc"] == 0 for r in stages.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
