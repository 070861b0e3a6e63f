"""The whole pipeline in one call: train -> merge -> export GGUF (verified) -> before/after chat -> eval.

`care demo` runs it on the built-in demo recipe (the embedded SmolLM2-135M-Instruct, a short multi-domain
QLoRA run on the sample exchanges shipped in care/data/samples); `care demo --recipe R.yaml [--smoke]` runs it
for any recipe, which is how the slow test checks every shipped recipe end to end.

Output folder layout:
    recipe.yaml            resolved config, written first
    train/                 care.train output (adapter/, metrics.jsonl, loss.png, data_report.json, ...)
    merged/                merged Hugging Face model (care.train.merge)
    gguf/                  exported GGUF(s), manifest.json, verify.json (care.export)
    base-gguf/             the base model as GGUF, when the base is not the embedded one
    eval/, eval-gen/       care.eval results (when the recipe asks for them)
    demo_report.json/.md   what ran, how long each stage took, before/after answers, the chat command

The report is rewritten after every stage, so Ctrl-C (or a failure) leaves an accurate partial report with
the stage marked `interrupted` / `failed`, and nothing already written is removed.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from care.errors import ConfigError, DataError
from care.io import write_json, write_text
from care.train.config import Recipe, recipe_from_dict

log = logging.getLogger(__name__)

SAMPLES_DIR = Path(__file__).resolve().parent / "data" / "samples"
SAMPLE_DOMAINS = ("banking", "telecom", "medical")

# Questions for the before/after comparison, one per domain. None of them is in the sample training data
# (tests/test_demo.py checks that), so the answers show what the model learned, not what it memorised.
QUESTIONS: dict[str, str] = {
    "banking": "My bank card was stolen from my bag an hour ago. What should I do now?",
    "telecom": "My broadband keeps dropping out several times a day. What can I try?",
    "medical": "I have had a sore throat and a mild fever since yesterday. What should I do?",
    "general": "I ordered a blue jacket but received a red one. What should I do?",
}

# ~0.9 epoch of the 87 balanced training rows at batch 4. Measured on 2 CPU cores: ~8 s per QLoRA step
# (bitsandbytes NF4 on CPU), the whole demo 3.4 min, leaving room in the 15-minute budget for slower machines.
DEFAULT_STEPS = 20

STAGES = ("train", "merge", "export", "before_after", "eval")


def sample_file(domain: str) -> Path:
    """Path of a shipped sample file (banking, telecom, medical, customer_service_train/test)."""
    name = f"{domain}.jsonl" if domain in SAMPLE_DOMAINS else f"{domain}.json"
    path = SAMPLES_DIR / name
    if not path.is_file():
        raise DataError("Sample data file missing from the installed package", path=path,
                        hint="Reinstall care (pip install -e .) or check care/data/samples")
    return path


def demo_recipe_dict(max_steps: int = DEFAULT_STEPS) -> dict[str, Any]:
    """The built-in demo recipe: CARE's method (balanced domains, NF4 QLoRA r=8 alpha=32 dropout 0.05) on the
    embedded SmolLM2-135M with the shipped samples, sized to finish well inside 15 minutes on 2 CPU cores."""
    return {
        "name": "care-demo-smollm2",
        "model": {"base": "embedded"},
        "data": {
            "sources": [{"path": str(sample_file(d))} for d in SAMPLE_DOMAINS],
            "balance": "downsample",
            "dedupe": True,
            "val_fraction": 0.1,
            "seed": 42,
        },
        "lora": {"r": 8, "alpha": 32, "dropout": 0.05, "bias": "none", "use_rslora": False,
                 "target_modules": "all-linear"},
        "quant": {"load_in_4bit": True, "quant_type": "nf4", "double_quant": True, "compute_dtype": "auto"},
        "training": {
            "lr": 8.0e-4, "max_steps": max_steps, "batch": 4, "grad_accum": 1, "max_length": 256,
            "warmup": 2, "scheduler": "cosine", "optim": "adamw_torch", "logging_steps": 2,
            "eval_steps": max(2, max_steps // 2), "save_steps": max(2, max_steps // 2), "save_total_limit": 1,
            "seed": 42, "completion_only": True,
        },
        # SmolLM2's base is itself dequantized from Q4_1, and NF4 of that differs from it enough that merging
        # into a reloaded base lost the fine-tune (measured: top-1 agreement with the trained model 0.61);
        # merging into the dequantized NF4 base reproduces the trained function.
        "merge": {"method": "dequantize"},
        "export": {"quants": ["q4_k_m"], "verify": True},
        "eval": {},
        "smoke": {"training.max_steps": 4},
    }


def demo_recipe(max_steps: int = DEFAULT_STEPS, overrides: Sequence[str] | None = None) -> Recipe:
    return recipe_from_dict(demo_recipe_dict(max_steps), overrides=list(overrides or []))


# -- reporting ----------------------------------------------------------------------------------------------

@dataclass
class StageRecord:
    name: str
    status: str = "pending"  # pending | running | done | skipped | failed | interrupted
    seconds: float = 0.0
    summary: str = ""
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class PipelineReport:
    recipe_name: str
    out_dir: Path
    recipe_path: str | None
    smoke: bool
    stages: list[StageRecord]
    started_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    total_seconds: float = 0.0
    status: str = "running"  # running | done | failed | interrupted
    base_gguf: str | None = None
    tuned_gguf: str | None = None
    before_after: list[dict[str, Any]] = field(default_factory=list)
    chat_command: str | None = None
    error: str | None = None
    machine: dict[str, Any] = field(default_factory=dict)

    def stage(self, name: str) -> StageRecord:
        return next(s for s in self.stages if s.name == name)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out_dir"] = str(self.out_dir)
        return _jsonable(d)


def _jsonable(obj: Any) -> Any:
    """Plain JSON types for reports of other modules' result objects (dataclasses, Paths, numpy numbers)."""
    if hasattr(obj, "to_dict") and callable(obj.to_dict):
        obj = obj.to_dict()
    elif hasattr(obj, "__dataclass_fields__"):
        obj = asdict(obj)
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if hasattr(obj, "item"):
        try:
            return obj.item()
        except (TypeError, ValueError):
            pass
    return str(obj)


def _fmt_s(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{seconds:.1f}s"


def render_markdown(rep: PipelineReport) -> str:
    lines = [f"# {rep.recipe_name}: pipeline report", "",
             f"- status: **{rep.status}**, total {_fmt_s(rep.total_seconds)}",
             f"- recipe: `{rep.recipe_path or 'built-in demo recipe'}`{' (smoke)' if rep.smoke else ''}",
             f"- output: `{rep.out_dir}`", f"- machine: {rep.machine.get('summary', '')}", ""]
    if rep.error:
        lines += [f"**Error:** {rep.error}", ""]
    lines += ["| stage | status | time | summary |", "|---|---|---|---|"]
    for s in rep.stages:
        summary = s.summary.replace("|", "\\|")  # a pipe would end the Markdown cell
        lines.append(f"| {s.name} | {s.status} | {_fmt_s(s.seconds) if s.seconds else ''} | {summary} |")
    if rep.before_after:
        lines += ["", "## Before / after (greedy, same questions)", "",
                  f"before: `{rep.base_gguf}`  ", f"after: `{rep.tuned_gguf}`", ""]
        for qa in rep.before_after:
            lines += [f"### [{qa['domain']}] {qa['question']}", "", "**Before:**", "",
                      _quote(qa.get("before", "")), "", "**After:**", "", _quote(qa.get("after", "")), ""]
    if rep.chat_command:
        lines += ["## Chat with the new model", "", "```bash", rep.chat_command, "```", ""]
    return "\n".join(lines)


def _quote(text: str) -> str:
    return "\n".join("> " + line for line in (text.strip() or "(empty)").splitlines())


def save_report(rep: PipelineReport) -> None:
    write_json(rep.out_dir / "demo_report.json", rep.to_dict())
    write_text(rep.out_dir / "demo_report.md", render_markdown(rep))


# -- progress hooks -----------------------------------------------------------------------------------------

class Reporter:
    """Progress hooks; the CLI subclasses it with rich output. The default logs."""

    def stage_start(self, index: int, total: int, name: str, description: str) -> None:
        log.info("[%d/%d] %s: %s", index, total, name, description)

    def stage_end(self, record: StageRecord) -> None:
        log.info("%s %s in %s: %s", record.name, record.status, _fmt_s(record.seconds), record.summary)

    def note(self, text: str) -> None:
        log.info("%s", text)

    def answer(self, domain: str, question: str, before: str, after: str) -> None:
        log.info("[%s] %s\nbefore: %s\nafter: %s", domain, question, before, after)

    def eval_progress(self, desc: str, total: int) -> Callable[[int], None]:
        return lambda _n: None

    def step(self, what: str, done: int, total: int) -> None:
        """Sub-step progress inside a stage (e.g. 'convert f16', 120, 272)."""


# -- the stages ---------------------------------------------------------------------------------------------

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


def _machine(threads: int | None) -> dict[str, Any]:
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
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
    from care.runtime.engine import ChatEngine, EngineConfig, SamplingConfig

    rows = [{"domain": d, "question": q} for d, q in questions.items()]
    sampling = SamplingConfig(temperature=0.0, seed=0, max_tokens=max_tokens)
    for side, path in (("before", base_gguf), ("after", tuned_gguf)):
        engine = ChatEngine(path, EngineConfig(n_ctx=n_ctx, n_threads=threads, sampling=sampling))
        try:
            for row in rows:
                msgs = [{"role": "system", "content": system_prompt(row["domain"])},
                        {"role": "user", "content": row["question"]}]
                res = engine.chat(msgs)
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
        result["mc"] = {"results": res.get("results"), "files": _jsonable(files), "out": str(out / "eval")}
    if sets:
        res, files = run_generate(models, sets, out / "eval-gen", data_dir=data_dir, limit=limit,
                                  max_tokens=int(cfg.get("max_tokens") or 128), threads=opts.threads,
                                  n_ctx=opts.n_ctx, bertscore=bool(cfg.get("bertscore", False)),
                                  progress=reporter.eval_progress)
        result["generation"] = {"results": res.get("results"), "files": _jsonable(files),
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


def run_pipeline(recipe: Recipe, out_dir: str | Path, *, smoke: bool = False,
                 options: PipelineOptions | None = None, reporter: Reporter | None = None) -> PipelineReport:
    """Train, merge, export (verified), answer the same questions before/after, evaluate; report everything.

    Raises KeyboardInterrupt (after saving the report) when interrupted, and the stage's CareError when a
    stage fails; in both cases the folder keeps what was written and demo_report.json says where it stopped."""
    opts = options or PipelineOptions()
    reporter = reporter or Reporter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    previous = out / "recipe.yaml"
    if previous.is_file() and previous.read_text(encoding="utf-8") != recipe.to_yaml():
        # Re-running into the same folder continues that run; a different recipe would reuse a stale adapter.
        raise ConfigError("The output folder holds a run of a different recipe", path=out,
                          hint="Choose another --out folder (same command and settings to continue a run)")
    write_text(out / "recipe.yaml", recipe.to_yaml())
    rep = PipelineReport(recipe_name=recipe.name, out_dir=out.resolve(),
                         recipe_path=str(recipe.path) if recipe.path else None, smoke=smoke,
                         stages=[StageRecord(n) for n in STAGES], machine=_machine(opts.threads))
    t_all = time.perf_counter()
    state: dict[str, Any] = {}

    def stage_train(rec: StageRecord) -> None:
        from care.train.sft import train

        # A folder from an earlier, interrupted run of the same command continues where it stopped.
        res = train(recipe, out / "train", resume=(out / "train").is_dir())
        rec.details = {"output_dir": str(res.output_dir), "adapter_dir": str(res.adapter_dir),
                       "metrics": _jsonable(res.metrics), "best_checkpoint": res.best_checkpoint}
        if res.interrupted or res.adapter_dir is None:
            raise KeyboardInterrupt
        m = res.metrics
        first, last = m.get("first_loss"), m.get("last_loss")
        rec.summary = (f"{m.get('global_step')} step(s) on {m.get('train_rows')} rows"
                       + (f", loss {first:.3f} -> {last:.3f}" if first is not None and last is not None else "")
                       + (f", best eval loss {m['best_eval_loss']:.3f}" if m.get("best_eval_loss") else ""))
        state["adapter"] = res.adapter_dir

    def stage_merge(rec: StageRecord) -> None:
        from care.train.merge import merge_adapter

        mcfg = recipe.merge or {}
        rpt = merge_adapter(state["adapter"], out / "merged", method=mcfg.get("method", "reload"), verify=True,
                            tolerance=None if mcfg.get("tolerance") is None else float(mcfg["tolerance"]))
        rec.details = _jsonable(rpt)
        rec.summary = (f"{rpt.method}: max |Δlogit| {rpt.max_abs_diff:.2g} vs the adapter model, "
                       f"top-1 agreement {rpt.top1_agreement:.3f}")
        state["merged"] = out / "merged"

    def stage_export(rec: StageRecord) -> None:
        from care.export.gguf import export_gguf

        ecfg = recipe.export or {}
        quants = tuple(ecfg.get("quants") or ("q4_k_m",))
        res = export_gguf(state["merged"], out / "gguf", quants=quants, verify=bool(ecfg.get("verify", True)),
                          name=ecfg.get("name") or recipe.name, n_threads=opts.threads, progress=reporter.step)
        files = {str(q): Path(p) for q, p in res.files.items()}
        tuned = files.get(quants[0]) or next(iter(files.values()))
        rec.details = {"files": _jsonable(files), "manifest": _jsonable(res.manifest_path),
                       "verify": _jsonable(res.verify_report), "notes": list(res.notes),
                       "seconds": _jsonable(res.seconds)}
        size = tuned.stat().st_size / 2**20
        rec.summary = f"{tuned.name} ({size:.0f} MiB)" + (", verified" if ecfg.get("verify", True) else "")
        state["tuned"] = tuned
        rep.tuned_gguf = str(tuned.resolve())
        rep.chat_command = f"care chat --model {shlex.quote(str(tuned.resolve()))}"

    def stage_before_after(rec: StageRecord) -> None:
        base = _base_gguf(recipe, out, recipe.export or {})
        state["base"] = base
        rep.base_gguf = str(base)
        qs = _questions(recipe, out / "train", opts)
        rows = before_after(base, state["tuned"], qs, max_tokens=opts.max_tokens, threads=opts.threads,
                            n_ctx=opts.n_ctx)
        rep.before_after = rows
        for r in rows:
            reporter.answer(r["domain"], r["question"], r.get("before", ""), r.get("after", ""))
        rec.summary = f"{len(rows)} questions, base vs tuned GGUF, temperature 0"

    def stage_eval(rec: StageRecord) -> None:
        cfg = recipe.eval or {}
        if not opts.run_eval or not (cfg.get("bench") or cfg.get("generate")):
            rec.status = "skipped"
            rec.summary = "not requested" if not opts.run_eval else "the recipe has no eval section"
            return
        res = run_eval(recipe, state["base"], state["tuned"], out, opts, reporter)
        rec.details = _jsonable(res)
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

    runners = {"train": stage_train, "merge": stage_merge, "export": stage_export,
               "before_after": stage_before_after, "eval": stage_eval}
    descriptions = {"train": "QLoRA fine-tuning", "merge": "merge the adapter and verify the logits",
                    "export": "GGUF export, quantize and verify", "before_after": "same questions, base vs tuned",
                    "eval": "benchmarks, base vs tuned"}
    for i, name in enumerate(STAGES, 1):
        rec = rep.stage(name)
        rec.status = "running"
        save_report(rep)
        t0 = time.perf_counter()
        try:
            reporter.stage_start(i, len(STAGES), name, descriptions[name])
            runners[name](rec)
            if rec.status == "running":
                rec.status = "done"
        except KeyboardInterrupt:
            rec.status, rep.status = "interrupted", "interrupted"
            raise
        except BaseException as exc:
            rec.status, rep.status = "failed", "failed"
            rep.error = exc.one_line() if hasattr(exc, "one_line") else f"{type(exc).__name__}: {exc}"
            raise
        finally:
            rec.seconds = round(time.perf_counter() - t0, 2)
            rep.total_seconds = round(time.perf_counter() - t_all, 2)
            if rec.status != "running":
                reporter.stage_end(rec)
            save_report(rep)
    rep.status = "done"
    rep.total_seconds = round(time.perf_counter() - t_all, 2)
    save_report(rep)
    return rep
