"""Results JSON, Markdown report, PNG charts, and the comparison of two result files."""

from __future__ import annotations

import json
import math
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from care.errors import DataError
from care.io import atomic_path, write_json, write_text

SCHEMA = "care-eval/1"
# Highest precision first: the quantization-delta chart is drawn in this order.
QUANT_ORDER = ("F32", "BF16", "F16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_1",
               "Q4_0", "Q3_K_M", "Q3_K_S", "Q2_K")


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def new_results(kind: str, settings: dict[str, Any]) -> dict[str, Any]:
    return {"schema": SCHEMA, "kind": kind, "created": now_iso(), "settings": settings, "models": [], "results": {}}


def load_results(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise DataError("Results file not found", path=path, hint="Pass a results.json written by `care eval run`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"Results file is not JSON ({exc.msg})", path=path,
                        hint="Pass a results.json written by `care eval run`") from exc
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise DataError("Not a care eval results file", path=path, hint="Pass a results.json written by `care eval`")
    return data


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


# -- charts ---------------------------------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, target: Path) -> Path:
    with atomic_path(target, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=130, bbox_inches="tight")
    _plt().close(fig)
    return target


def grouped_bars(groups: list[str], series: dict[str, list[float | None]], target: Path, *, title: str,
                 ylabel: str, errors: dict[str, list[tuple[float, float] | None]] | None = None,
                 chance: dict[str, float] | None = None, percent: bool = True) -> Path:
    """One cluster of bars per group (benchmark), one bar per series (model), value labels on top."""
    plt = _plt()
    import numpy as np

    n_series = max(1, len(series))
    width = 0.8 / n_series
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(groups) * max(1, n_series / 2) + 2), 4.6))
    x = np.arange(len(groups))
    scale = 100 if percent else 1
    for i, (name, values) in enumerate(series.items()):
        vals = [np.nan if v is None else v * scale for v in values]
        pos = x - 0.4 + width * (i + 0.5)
        yerr = None
        if errors and name in errors:
            lo = [0 if e is None or v is None else max(0.0, v - e[0]) * scale for v, e in zip(values, errors[name], strict=True)]
            hi = [0 if e is None or v is None else max(0.0, e[1] - v) * scale for v, e in zip(values, errors[name], strict=True)]
            yerr = [lo, hi]
        bars = ax.bar(pos, vals, width * 0.92, label=name, yerr=yerr, capsize=3, error_kw={"elinewidth": 0.8})
        for b, v in zip(bars, vals, strict=True):
            if not np.isnan(v):
                ax.annotate(f"{v:.1f}" if percent else f"{v:.3f}", (b.get_x() + b.get_width() / 2, v),
                            xytext=(0, 2), textcoords="offset points", ha="center", va="bottom", fontsize=7)
    if chance:
        for gi, g in enumerate(groups):
            if g in chance:
                ax.hlines(chance[g] * scale, gi - 0.42, gi + 0.42, colors="grey", linestyles="dashed", linewidth=1)
    ax.set_xticks(x, groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if percent:
        ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right", framealpha=0.9)
    fig.tight_layout()
    return _save(fig, target)


def quant_ranked(results: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, quant) of the GGUF models, highest precision first."""
    quants = {m["label"]: m.get("quant", "").upper() for m in results["models"] if m.get("kind") == "gguf"}
    ranked = sorted((QUANT_ORDER.index(q) if q in QUANT_ORDER else len(QUANT_ORDER), q, label)
                    for label, q in quants.items())
    return [(label, q) for _, q, label in ranked]


def agreement(results: dict[str, Any], ref: str, other: str, bench: str) -> float | None:
    """Share of common items on which `other` picks the same option as `ref` (more sensitive than accuracy)."""
    ra = {r["id"]: r["pred"] for r in results["results"].get(ref, {}).get(bench, {}).get("items", [])}
    rb = {r["id"]: r["pred"] for r in results["results"].get(other, {}).get(bench, {}).get("items", [])}
    ids = [i for i in ra if i in rb]
    return sum(ra[i] == rb[i] for i in ids) / len(ids) if ids else None


def quant_delta_chart(results: dict[str, Any], target: Path) -> Path | None:
    """Left: accuracy per benchmark across quantization levels of GGUF models (F16 -> Q8_0 -> Q4_K_M ...), with
    the change in points from the highest-precision file; right: how often each file picks the same answer as
    that file. None when fewer than two quant levels were run."""
    ranked = quant_ranked(results)
    if len({q for _, q in ranked}) < 2:
        return None
    plt = _plt()
    labels = [label for label, _ in ranked]
    xs = [f"{q}\n({label})" if label.upper() != q else q for label, q in ranked]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(max(10.0, 3.2 * len(xs) + 2), 4.6))
    benches = sorted({b for lab in labels for b in results["results"].get(lab, {})})
    for k, bench in enumerate(benches):
        ys = [results["results"].get(lab, {}).get(bench, {}).get("accuracy") for lab in labels]
        if ys[0] is None:
            continue
        pts = [(i, 100 * y) for i, y in enumerate(ys) if y is not None]
        line = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=bench)[0]
        for i, y in pts[1:]:
            # Staggered per benchmark so labels of overlapping lines stay readable.
            ax.annotate(f"{y - pts[0][1]:+.1f}", (i, y), xytext=(5, 3 + 9 * k), textcoords="offset points",
                        fontsize=7, color=line.get_color())
        agree = [agreement(results, labels[0], lab, bench) for lab in labels]
        ax2.plot(range(len(labels)), [None if a is None else 100 * a for a in agree], marker="o",
                 color=line.get_color(), label=bench)
    for a in (ax, ax2):
        a.set_xticks(range(len(xs)), xs)
        a.set_xlim(-0.4, len(xs) - 0.4)  # room for the delta labels
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Accuracy (labels: points vs {ranked[0][1]})")
    ax2.set_ylabel(f"same answer as {ranked[0][1]} (%)")
    ax2.set_ylim(min(50.0, ax2.get_ylim()[0]), 101)
    ax2.set_title(f"Answers unchanged from {ranked[0][1]}")
    fig.suptitle("Quantization delta")
    fig.tight_layout()
    return _save(fig, target)


# -- multiple-choice report -----------------------------------------------------------------------------

CHANCE = {"medmcqa": 0.25, "mmlu_medical": 0.25, "medqa": 0.25, "pubmedqa": 1 / 3}


def mc_charts(results: dict[str, Any], out: Path) -> list[Path]:
    labels = [m["label"] for m in results["models"]]
    benches = list(dict.fromkeys(b for lab in labels for b in results["results"].get(lab, {})))
    if not benches:
        return []
    series = {lab: [results["results"][lab].get(b, {}).get("accuracy") for b in benches] for lab in labels}
    errors = {lab: [tuple(results["results"][lab][b]["ci95"]) if b in results["results"][lab] else None
                    for b in benches] for lab in labels}
    shots = results["settings"].get("shots", 0)
    charts = [grouped_bars(benches, series, out / "accuracy.png", errors=errors, chance=CHANCE,
                           title=f"Accuracy per benchmark ({shots}-shot, 95% Wilson CI; dashed: chance)",
                           ylabel="accuracy (%)")]
    q = quant_delta_chart(results, out / "quant_delta.png")
    if q:
        charts.append(q)
    if "mmlu_medical" in benches:
        subjects = sorted({s for lab in labels for s in results["results"][lab].get("mmlu_medical", {})
                           .get("subjects", {})})
        sub_series = {lab: [results["results"][lab].get("mmlu_medical", {}).get("subjects", {}).get(s, {})
                            .get("accuracy") for s in subjects] for lab in labels}
        counts = {s: max(results["results"][lab].get("mmlu_medical", {}).get("subjects", {}).get(s, {}).get("n", 0)
                         for lab in labels) for s in subjects}
        ticks = [s.replace("_", "\n") + f"\n(n={counts[s]})" for s in subjects]
        charts.append(grouped_bars(ticks, sub_series, out / "mmlu_subjects.png",
                                   title=f"MMLU medical subjects ({shots}-shot)", ylabel="accuracy (%)"))
    return charts


def mc_markdown(results: dict[str, Any], charts: list[Path]) -> str:
    s = results["settings"]
    labels = [m["label"] for m in results["models"]]
    benches = list(dict.fromkeys(b for lab in labels for b in results["results"].get(lab, {})))
    lines = ["# CARE Edge evaluation: multiple-choice benchmarks", "",
             f"Created {results['created']}. {s.get('shots', 0)}-shot, scored by the log-likelihood of each option "
             "letter (lm-evaluation-harness style); accuracy in % with a 95% Wilson interval. "
             f"Subsample: limit {s.get('limit') or 'none'}, seed {s.get('seed')}.", "",
             "## Models", "", "| label | kind | quant | path | sha256 (first file) |", "|---|---|---|---|---|"]
    for m in results["models"]:
        first = next(iter(m.get("files", {}).items()), ("", ""))
        lines.append(f"| {m['label']} | {m['kind']} | {m.get('quant', '')} | `{m['path']}` | "
                     f"{first[0]} `{first[1][:16]}` |")
    lines += ["", "## Accuracy", "", "| benchmark | n | " + " | ".join(labels) + " |",
              "|---|---|" + "---|" * len(labels)]
    for b in benches:
        n = next((results["results"][lab][b]["n"] for lab in labels if b in results["results"][lab]), 0)
        cells = []
        for lab in labels:
            r = results["results"][lab].get(b)
            cells.append(f"{_pct(r['accuracy'])} [{_pct(r['ci95'][0])}, {_pct(r['ci95'][1])}]" if r else "-")
        lines.append(f"| {b} | {n} | " + " | ".join(cells) + " |")
    lines.append("")
    ranked = quant_ranked(results)
    if len({q for _, q in ranked}) >= 2:
        ref = ranked[0][0]
        lines += [f"### Quantization delta (vs {ref})", "", "| benchmark | " + " | ".join(
            f"{lab} Δ pts / same answer %" for lab, _ in ranked[1:]) + " |", "|---|" + "---|" * (len(ranked) - 1)]
        for b in benches:
            cells = []
            for lab, _ in ranked[1:]:
                ra, rb = results["results"][ref].get(b), results["results"][lab].get(b)
                agree = agreement(results, ref, lab, b)
                cells.append("-" if not (ra and rb and agree is not None) else
                             f"{100 * (rb['accuracy'] - ra['accuracy']):+.1f} / {_pct(agree)}")
            lines.append(f"| {b} | " + " | ".join(cells) + " |")
        lines.append("")
    for c in charts:
        lines += [f"![{c.stem}]({c.name})", ""]
    for b in benches:
        subjects = sorted({sub for lab in labels for sub in results["results"][lab].get(b, {}).get("subjects", {})})
        if len(subjects) < 2:
            continue
        lines += [f"### {b} per subject", "", "| subject | n | " + " | ".join(labels) + " |",
                  "|---|---|" + "---|" * len(labels)]
        for sub in subjects:
            rows = [results["results"][lab].get(b, {}).get("subjects", {}).get(sub) for lab in labels]
            n = next((r["n"] for r in rows if r), 0)
            lines.append(f"| {sub} | {n} | " + " | ".join(_pct(r["accuracy"]) if r else "-" for r in rows) + " |")
        lines.append("")
    trunc = {(lab, b): r.get("truncated_contexts", 0) for lab in labels for b, r in results["results"][lab].items()
             if r.get("truncated_contexts")}
    if trunc:
        lines += ["Contexts cut from the left to fit the model: " +
                  ", ".join(f"{lab}/{b}: {n}" for (lab, b), n in trunc.items()), ""]
    return "\n".join(lines)


# -- generation report ----------------------------------------------------------------------------------

GEN_METRICS = (("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2"), ("rougeL", "ROUGE-L"), ("rougeLsum", "ROUGE-Lsum"),
               ("bertscore", "BERTScore F1"), ("decision", "decision acc"))


def _gen_value(r: dict[str, Any], key: str) -> float | None:
    if key.startswith("rouge"):
        return r["rouge"][key]
    if key == "bertscore":
        return r.get("bertscore", {}).get("f1")
    return r.get("decision", {}).get("accuracy")


def gen_charts(results: dict[str, Any], out: Path) -> list[Path]:
    labels = [m["label"] for m in results["models"]]
    charts = []
    sets = list(dict.fromkeys(s for lab in labels for s in results["results"].get(lab, {})))
    for name in sets:
        keys = [(k, t) for k, t in GEN_METRICS
                if any(_gen_value(results["results"][lab][name], k) is not None
                       for lab in labels if name in results["results"][lab])]
        series = {lab: [_gen_value(results["results"][lab][name], k) if name in results["results"][lab] else None
                        for k, _ in keys] for lab in labels}
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(name).stem)
        charts.append(grouped_bars([t for _, t in keys], series, out / f"generation_{safe}.png",
                                   title=f"Generation metrics: {name}", ylabel="score (%)"))
    return charts


def gen_markdown(results: dict[str, Any], charts: list[Path]) -> str:
    s = results["settings"]
    labels = [m["label"] for m in results["models"]]
    lines = ["# CARE Edge evaluation: generation metrics", "",
             f"Created {results['created']}. Greedy decoding, max {s.get('max_tokens')} new tokens; limit "
             f"{s.get('limit') or 'none'}, seed {s.get('seed')}. ROUGE F-measures with Porter stemming (rouge-score).",
             ""]
    if s.get("bertscore_note"):
        lines += [f"BERTScore: {s['bertscore_note']}.", ""]
    lines += ["## Models", "", "| label | kind | path |", "|---|---|---|"]
    lines += [f"| {m['label']} | {m['kind']} | `{m['path']}` |" for m in results["models"]]
    sets = list(dict.fromkeys(x for lab in labels for x in results["results"].get(lab, {})))
    for name in sets:
        lines += ["", f"## {name}", "", "| metric | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
        for key, title in GEN_METRICS:
            vals = [_gen_value(results["results"][lab][name], key) if name in results["results"][lab] else None
                    for lab in labels]
            if any(v is not None for v in vals):
                lines.append(f"| {title} | " + " | ".join("-" if v is None else _pct(v) for v in vals) + " |")
        for extra, title in (("macro_f1", "decision macro F1"), ("weighted_f1", "decision weighted F1")):
            vals = [results["results"][lab].get(name, {}).get("decision", {}).get(extra) for lab in labels]
            if any(v is not None for v in vals):
                lines.append(f"| {title} | " + " | ".join("-" if v is None else _pct(v) for v in vals) + " |")
        lens = [results["results"][lab].get(name, {}).get("length", {}).get("mean_words") for lab in labels]
        lines.append("| answer length (words) | " + " | ".join("-" if v is None else f"{v:.0f}" for v in lens) + " |")
        ref = next((results["results"][lab][name]["reference_length"]["mean_words"] for lab in labels
                    if name in results["results"][lab]), None)
        if ref is not None:
            lines.append(f"\nReference answers average {ref:.0f} words.")
    lines.append("")
    for c in charts:
        lines += [f"![{c.stem}]({c.name})", ""]
    return "\n".join(lines)


def write_report(results: dict[str, Any], out: Path) -> dict[str, Path]:
    """results.json, report.md and the PNG charts in `out`; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    charts = mc_charts(results, out) if results["kind"] == "mc" else gen_charts(results, out)
    md = mc_markdown(results, charts) if results["kind"] == "mc" else gen_markdown(results, charts)
    paths = {"results": write_json(out / "results.json", results), "report": write_text(out / "report.md", md)}
    paths.update({c.stem: c for c in charts})
    return paths


# -- compare --------------------------------------------------------------------------------------------

def _mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar test on the discordant pairs (binomial, p = 0.5)."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Per benchmark and model pair: accuracy of A and B on their common item ids, the paired change and McNemar p.

    Models are paired by label when both files have it, else every model of A against every model of B."""
    rows: list[dict[str, Any]] = []
    warnings: list[str] = []
    for key in ("shots", "prompt_version"):
        if a["settings"].get(key) != b["settings"].get(key):
            warnings.append(f"settings differ: {key} {a['settings'].get(key)} vs {b['settings'].get(key)}")
    la, lb = list(a["results"]), list(b["results"])
    common = [lab for lab in la if lab in lb]
    pairs = [(lab, lab) for lab in common] if common else [(x, y) for x in la for y in lb]
    for xa, xb in pairs:
        for bench in a["results"][xa]:
            if bench not in b["results"][xb]:
                continue
            ra, rb = a["results"][xa][bench], b["results"][xb][bench]
            if a["kind"] == "mc":
                ia = {r["id"]: r["correct"] for r in ra["items"]}
                ib = {r["id"]: r["correct"] for r in rb["items"]}
                ids = [i for i in ia if i in ib]
                if len(ids) < max(len(ia), len(ib)):
                    warnings.append(f"{bench}: {len(ids)} common items ({len(ia)} in A, {len(ib)} in B)")
                n = len(ids)
                acc_a = sum(ia[i] for i in ids) / n if n else 0.0
                acc_b = sum(ib[i] for i in ids) / n if n else 0.0
                only_a = sum(ia[i] and not ib[i] for i in ids)
                only_b = sum(ib[i] and not ia[i] for i in ids)
                rows.append({"benchmark": bench, "model_a": xa, "model_b": xb, "n": n, "a": acc_a, "b": acc_b,
                             "delta": acc_b - acc_a, "a_only_correct": only_a, "b_only_correct": only_b,
                             "mcnemar_p": _mcnemar_p(only_a, only_b)})
            else:
                for key, title in GEN_METRICS:
                    va, vb = _gen_value(ra, key), _gen_value(rb, key)
                    if va is not None and vb is not None:
                        rows.append({"benchmark": f"{bench} {title}", "model_a": xa, "model_b": xb, "n": ra["n"],
                                     "a": va, "b": vb, "delta": vb - va})
    return {"rows": rows, "warnings": warnings}
