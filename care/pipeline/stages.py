"""The pipeline's stages as functions over one `RunContext`: train, merge, export, before_after, eval.

Each stage reads what the earlier ones left in the context (adapter, merged folder, GGUFs), fills in its
`StageRecord` (status, summary, details) and may raise; care.pipeline.run orders them and keeps the report.
"""

from __future__ import annotations

import json
import platform
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from care.errors import ConfigError
from care.pipeline.recipe import QUESTIONS
from care.pipeline.report import PipelineReport, Reporter, StageRecord, jsonable
from care.train.config import Recipe


@dataclass
class PipelineOptions:
    run_eval: bool = True
    eval_limit: int | None = None  # overrides recipe eval.limit
    max_tokens: int = 160  # before/after answers
    threads: int | None = None  # llama.cpp threads; None: the engine's default (idle cores)
    n_ctx: int = 2048
    questions: dict[str, str] | None = None  # domain -> question; default: QUESTIONS for the trained domains


def default_out_dir(name: str = "demo") -> Path:
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def machine_summary(threads: int | None) -> dict[str, Any]:
    import torch

    from care.system import usable_cpus

    cores = usable_cpus()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    return {"cpu_cores": cores, "torch_threads": torch.get_num_threads(), "llama_threads": threads,
            "device": dev, "python": platform.python_version(), "platform": platform.platform(),
            "summary": f"{cores} CPU cores, torch on {dev} ({torch.get_num_threads()} threads), "
                       f"{platform.machine()}"}


def _base_gguf(recipe: Recipe, out: Path, export_cfg: dict[str, Any]) -> Path:
    """The base model as a GGUF for the 'before' side: the embedded GGUF itself, or an export of the base."""
    from care.train.modeling import EMBEDDED, resolve_base

    base = str(recipe.model.get("base") or EMBEDDED)
    if base in (EMBEDDED, "default", "smollm2-135m") and not recipe.model.get("gguf_file"):
        from care.models import embedded_gguf

        return embedded_gguf()
    if base.endswith(".gguf") and recipe.resolve_path(base).is_file():
        return recipe.resolve_path(base)
    folder = Path(resolve_base(recipe.model, recipe.resolve_path))
    if not folder.is_dir():  # a hub id: its local snapshot, if cached (the hub is never contacted)
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(str(folder), local_files_only=True))
        except Exception as exc:  # noqa: BLE001 - huggingface_hub raises several kinds for "not cached"
            from care.errors import ModelNotFoundError

            raise ModelNotFoundError(f"Base model '{folder}' is not in the local Hugging Face cache",
                                     hint="Set model.base to a local folder (the hub is never contacted here)"
                                     ) from exc
    from care.export.gguf import export_gguf

    quant = (export_cfg.get("quants") or ["q4_k_m"])[0]
    res = export_gguf(folder, out / "base-gguf", quants=(quant,), verify=False, name=f"{recipe.name}-base")
    return Path(res.files[quant])


def _questions(recipe: Recipe, train_dir: Path, opts: PipelineOptions) -> dict[str, str]:
    if opts.questions:
        return dict(opts.questions)
    domains: list[str] = []
    rep_path = train_dir / "data_report.json"
    if rep_path.is_file():
        rep = json.loads(rep_path.read_text(encoding="utf-8"))
        for st in rep.get("stages", []):
            domains += [d for d in st.get("train", {}) if d not in domains]
    chosen = {d: QUESTIONS[d] for d in domains if d in QUESTIONS}
    return chosen or {"general": QUESTIONS["general"]}


def before_after(base_gguf: Path, tuned_gguf: Path, questions: dict[str, str], *, max_tokens: int = 120,
                 threads: int | None = None, n_ctx: int = 2048) -> list[dict[str, Any]]:
    """The same questions, with each domain's system prompt, to the base and the tuned GGUF (greedy)."""
    from care.domains import system_prompt
    from care.runtime.backend import EngineConfig, SamplingConfig
    from care.runtime.loader import load_engine

    rows = [{"domain": d, "question": q} for d, q in questions.items()]
    sampling = SamplingConfig(temperature=0.0, seed=0, max_tokens=max_tokens)
    for side, path in (("before", base_gguf), ("after", tuned_gguf)):
        engine = load_engine(path, EngineConfig(n_ctx=n_ctx, n_threads=threads, sampling=sampling))
        try:
            for row in rows:
                msgs = [{"role": "system", "content": system_prompt(row["domain"])},
                        {"role": "user", "content": row["question"]}]
                res = engine.generate(msgs)
                row[side] = res.text.strip()
                row[f"{side}_finish"] = res.finish_reason
                row[f"{side}_tokens"] = res.completion_tokens
                row[f"{side}_tokens_per_s"] = round(res.tokens_per_s, 1)
        finally:
            engine.close()
    return rows


def run_eval(recipe: Recipe, base_gguf: Path, tuned_gguf: Path, out: Path, opts: PipelineOptions,
             reporter: Reporter) -> dict[str, Any]:
    """Base vs tuned on the recipe's eval section: `bench` (multiple choice) and/or `generate` sets."""
    from care.paths import shared_data_dir

    cfg = recipe.eval or {}
    limit = opts.eval_limit if opts.eval_limit is not None else cfg.get("limit")
    models = [f"base={base_gguf}", f"tuned={tuned_gguf}"]
    data_dir = shared_data_dir()
    result: dict[str, Any] = {}
    benches = list(cfg.get("bench") or [])
    sets = []
    for s in cfg.get("generate") or []:
        if s == "test_file":
            if not cfg.get("test_file"):
                raise ConfigError("eval.generate lists test_file but eval.test_file is not set", path=recipe.path,
                                  hint="Set eval.test_file to a text/completion JSON or query/response JSONL")
            sets.append(str(recipe.resolve_path(cfg["test_file"])))  # eval reads text/completion JSON
        else:
            sets.append(str(s))
    needs_shared = bool(benches) or any(s in ("pubmedqa", "medquad", "bitext") for s in sets)
    if needs_shared and data_dir is None:
        return {"skipped": "../shared/data not found (set CARE_SHARED_DATA) for " + ", ".join(benches or sets)}
    from care.eval.runner import run_generate, run_mc

    if benches:
        res, files = run_mc(models, benches, out / "eval", data_dir=data_dir, shots=int(cfg.get("shots") or 0),
                            limit=limit, threads=opts.threads, n_ctx=opts.n_ctx, progress=reporter.eval_progress)
        result["mc"] = {"results": res.get("results"), "files": jsonable(files), "out": str(out / "eval")}
    if sets:
        res, files = run_generate(models, sets, out / "eval-gen", data_dir=data_dir, limit=limit,
                                  max_tokens=int(cfg.get("max_tokens") or 128), threads=opts.threads,
                                  n_ctx=opts.n_ctx, bertscore=bool(cfg.get("bertscore", False)),
                                  progress=reporter.eval_progress)
        result["generation"] = {"results": res.get("results"), "files": jsonable(files),
                                "out": str(out / "eval-gen")}
    return result


def _summary_mc(result: dict[str, Any]) -> str:
    parts = []
    for label, per in (result.get("results") or {}).items():
        accs = []
        for bench, r in per.items():
            acc = r.get("accuracy") if isinstance(r, dict) else None
            if isinstance(acc, (int, float)):
                accs.append(f"{bench} {acc:.2f}")
        parts.append(f"{label}: " + ", ".join(accs))
    return "; ".join(parts)


def _summary_gen(result: dict[str, Any]) -> str:
    parts = []
    for label, per in (result.get("results") or {}).items():
        vals = [f"ROUGE-L {r['rouge']['rougeL'] * 100:.1f}" for r in per.values()
                if isinstance(r, dict) and isinstance(r.get("rouge"), dict) and "rougeL" in r["rouge"]]
        parts.append(f"{label}: " + ", ".join(vals))
    return "; ".join(parts) + f" (report: {result.get('out')}/report.md)"


@dataclass
class RunContext:
    """Everything one pipeline run shares between its stages."""

    recipe: Recipe
    out: Path
    options: PipelineOptions
    reporter: Reporter
    report: PipelineReport
    adapter: Path | None = None  # train ->
    merged: Path | None = None  # merge ->
    tuned: Path | None = None  # export -> the tuned GGUF
    base: Path | None = None  # before_after -> the base GGUF
    extra: dict[str, Any] = field(default_factory=dict)


def stage_train(ctx: RunContext, rec: StageRecord) -> None:
    from care.train.sft import train

    train_dir = ctx.out / "train"
    # A folder from an earlier, interrupted run of the same command continues where it stopped.
    res = train(ctx.recipe, train_dir, resume=train_dir.is_dir())
    rec.details = {"output_dir": str(res.output_dir), "adapter_dir": str(res.adapter_dir),
                   "metrics": jsonable(res.metrics), "best_checkpoint": res.best_checkpoint}
    if res.interrupted or res.adapter_dir is None:
        raise KeyboardInterrupt
    m = res.metrics
    first, last = m.get("first_loss"), m.get("last_loss")
    rec.summary = (f"{m.get('global_step')} step(s) on {m.get('train_rows')} rows"
                   + (f", loss {first:.3f} -> {last:.3f}" if first is not None and last is not None else "")
                   + (f", best eval loss {m['best_eval_loss']:.3f}" if m.get("best_eval_loss") else ""))
    ctx.adapter = Path(res.adapter_dir)


def stage_merge(ctx: RunContext, rec: StageRecord) -> None:
    from care.train.merge import merge_adapter

    mcfg = ctx.recipe.merge or {}
    rpt = merge_adapter(ctx.adapter, ctx.out / "merged", method=mcfg.get("method", "reload"), verify=True,
                        tolerance=None if mcfg.get("tolerance") is None else float(mcfg["tolerance"]))
    rec.details = jsonable(rpt)
    rec.summary = (f"{rpt.method}: max |Δlogit| {rpt.max_abs_diff:.2g} vs the adapter model, "
                   f"top-1 agreement {rpt.top1_agreement:.3f}")
    ctx.merged = ctx.out / "merged"


def stage_export(ctx: RunContext, rec: StageRecord) -> None:
    from care.export.gguf import export_gguf

    ecfg = ctx.recipe.export or {}
    quants = tuple(ecfg.get("quants") or ("q4_k_m",))
    res = export_gguf(ctx.merged, ctx.out / "gguf", quants=quants, verify=bool(ecfg.get("verify", True)),
                      name=ecfg.get("name") or ctx.recipe.name, n_threads=ctx.options.threads,
                      progress=ctx.reporter.step)
    files = {str(q): Path(p) for q, p in res.files.items()}
    tuned = files.get(quants[0]) or next(iter(files.values()))
    rec.details = {"files": jsonable(files), "manifest": jsonable(res.manifest_path),
                   "verify": jsonable(res.verify_report), "notes": list(res.notes),
                   "seconds": jsonable(res.seconds)}
    size = tuned.stat().st_size / 2**20
    rec.summary = f"{tuned.name} ({size:.0f} MiB)" + (", verified" if ecfg.get("verify", True) else "")
    ctx.tuned = tuned
    ctx.report.tuned_gguf = str(tuned.resolve())
    ctx.report.chat_command = f"care chat --model {shlex.quote(str(tuned.resolve()))}"


def stage_before_after(ctx: RunContext, rec: StageRecord) -> None:
    assert ctx.tuned is not None  # the export stage ran
    base = _base_gguf(ctx.recipe, ctx.out, ctx.recipe.export or {})
    ctx.base = base
    ctx.report.base_gguf = str(base)
    qs = _questions(ctx.recipe, ctx.out / "train", ctx.options)
    rows = before_after(base, ctx.tuned, qs, max_tokens=ctx.options.max_tokens, threads=ctx.options.threads,
                        n_ctx=ctx.options.n_ctx)
    ctx.report.before_after = rows
    for r in rows:
        ctx.reporter.answer(r["domain"], r["question"], r.get("before", ""), r.get("after", ""))
    rec.summary = f"{len(rows)} questions, base vs tuned GGUF, temperature 0"


def stage_eval(ctx: RunContext, rec: StageRecord) -> None:
    cfg = ctx.recipe.eval or {}
    if not ctx.options.run_eval or not (cfg.get("bench") or cfg.get("generate")):
        rec.status = "skipped"
        rec.summary = "not requested" if not ctx.options.run_eval else "the recipe has no eval section"
        return
    assert ctx.base is not None and ctx.tuned is not None
    res = run_eval(ctx.recipe, ctx.base, ctx.tuned, ctx.out, ctx.options, ctx.reporter)
    rec.details = jsonable(res)
    if "skipped" in res:
        rec.status = "skipped"
        rec.summary = res["skipped"]
        return
    parts = []
    if "mc" in res:
        parts.append(_summary_mc(res["mc"]))
    if "generation" in res:
        parts.append(_summary_gen(res["generation"]))
    rec.summary = " | ".join(p for p in parts if p)


Stage = Callable[[RunContext, StageRecord], None]
# name -> (function, what the progress line says)
STAGE_FUNCTIONS: dict[str, tuple[Stage, str]] = {
    "train": (stage_train, "QLoRA fine-tuning"),
    "merge": (stage_merge, "merge the adapter and verify the logits"),
    "export": (stage_export, "GGUF export, quantize and verify"),
    "before_after": (stage_before_after, "same questions, base vs tuned"),
    "eval": (stage_eval, "benchmarks, base vs tuned"),
}
