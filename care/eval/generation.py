"""Query -> reference sets for the generation metrics, and the loop that generates and scores answers."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from care.domains import system_prompt
from care.errors import DataError, EvalError
from care.eval import metrics
from care.eval.backends import Backend
from care.eval.benchmarks import pubmedqa_long_answers, subsample

GEN_SETS = {
    "pubmedqa": "PubMedQA PQA-L test: abstract + question -> long answer (and yes/no/maybe decision)",
    "medquad": "MedQuAD consumer-health Q&A (medquad.normalized.jsonl.gz, pairs with answers)",
    "bitext": "Bitext customer-support sample: instruction -> response",
}
QUERY_KEYS = ("query", "question", "instruction", "prompt", "input", "text")
RESPONSE_KEYS = ("response", "answer", "reference", "output", "completion")


def _pick(row: dict, keys: Sequence[str]) -> str | None:
    for k in keys:
        if isinstance(row.get(k), str) and row[k].strip():
            return row[k]
    return None


def load_user_jsonl(path: Path) -> list[dict[str, Any]]:
    hint = (f"Each line must be a JSON object with a query ({'/'.join(QUERY_KEYS)}) and a reference "
            f"({'/'.join(RESPONSE_KEYS)})")
    from care.train.readers import iter_rows

    pairs = []
    for n, row in iter_rows(path, "jsonl"):  # the training data layer: .gz, bad UTF-8 and blank lines handled
        if row is None:
            raise DataError(f"Wrong data format at {path.name}:{n}: not JSON", path=path, hint=hint)
        q, r = (_pick(row, QUERY_KEYS), _pick(row, RESPONSE_KEYS)) if isinstance(row, dict) else (None, None)
        if q is None or r is None:
            raise DataError(f"Wrong data format at {path.name}:{n}: no query/reference field", path=path, hint=hint)
        pairs.append({"id": str(row.get("id", n)), "query": q, "response": r,
                      "domain": row.get("domain") or "general", **({"decision": row["decision"]}
                                                                  if "decision" in row else {})})
    return pairs


def _load_user_file(path: Path) -> list[dict[str, Any]]:
    """JSON lists, CSV, Parquet or datasets folders: the training data readers already map their columns
    (query/response, text/completion, instruction/output, messages), so eval reads them the same way."""
    from care.train.readers import BadRows, read_source

    records = read_source(path, None, BadRows(strict=True))
    return [{"id": r.id, "query": r.query, "response": r.response, "domain": r.domain} for r in records]


def load_gen_set(name: str, data_dir: Path | None, *, limit: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """Pairs {id, query, response, domain[, decision]} of a named set or a user's JSONL file."""
    path = Path(name)
    if name not in GEN_SETS:
        if path.is_file():
            pairs = load_user_jsonl(path) if path.name.endswith((".jsonl", ".jsonl.gz")) else _load_user_file(path)
            return subsample(pairs, limit, seed)
        raise EvalError(f"Unknown generation set '{name}'",
                        hint=f"Choose from: {', '.join(GEN_SETS)}, or pass a JSONL file path")
    if data_dir is None:
        raise DataError("The datasets folder was not found",
                        hint="Pass --data-dir (the folder with MANIFEST.md) or set CARE_SHARED_DATA")
    data_dir = Path(data_dir)
    if name == "pubmedqa":
        pairs = [{**p, "domain": "medical"} for p in pubmedqa_long_answers(data_dir)]
    elif name == "medquad":
        f = data_dir / "medquad" / "medquad.normalized.jsonl.gz"
        if not f.is_file():
            raise DataError("MedQuAD file not found", path=f, hint="Point --data-dir at the datasets folder")
        pairs = [{**p, "domain": "medical"} for p in load_user_jsonl(f)]
    else:
        files = sorted((data_dir / "bitext_customer_support").glob("*.csv"))
        if not files:
            raise DataError("Bitext CSV not found", path=data_dir / "bitext_customer_support",
                            hint="Point --data-dir at the datasets folder")
        from care.train.readers import iter_rows

        rows = [row for _, row in iter_rows(files[0], "csv")]
        if not rows or not {"instruction", "response"} <= set(rows[0]):
            raise DataError("Wrong data format: the Bitext CSV has no instruction/response columns",
                            path=files[0], hint="Use the official Bitext sample CSV")
        pairs = [{"id": f"bitext-{n}", "query": r["instruction"], "response": r["response"], "domain": "general"}
                 for n, r in enumerate(rows, 1)]
    return subsample(pairs, limit, seed)


def run_generation(backend: Backend, pairs: Sequence[dict[str, Any]], *, max_tokens: int = 256,
                   bertscorer: metrics.BERTScorer | None = None,
                   progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Generate an answer per query (greedy) and score it against the reference."""
    t0 = time.perf_counter()
    records = []
    for p in pairs:
        messages = [{"role": "system", "content": system_prompt(p.get("domain"))},
                    {"role": "user", "content": p["query"]}]
        answer = backend.generate(messages, max_tokens)
        records.append({"id": p["id"], "prediction": answer, "reference": p["response"],
                        **({"decision": p["decision"]} if "decision" in p else {})})
        if progress:
            progress(1)
    elapsed = time.perf_counter() - t0
    preds = [r["prediction"] for r in records]
    refs = [r["reference"] for r in records]
    for r in records:
        r["rouge"] = metrics.rouge_per_item(r["prediction"], r["reference"])
    summary: dict[str, Any] = {"n": len(records), "rouge": metrics.rouge(preds, refs),
                               "length": metrics.length_stats(preds),
                               "reference_length": metrics.length_stats(refs),
                               "elapsed_s": round(elapsed, 3)}
    if bertscorer is not None and records:
        bs = bertscorer.score(preds, refs)
        for r, s in zip(records, bs, strict=True):
            r["bertscore"] = s
        summary["bertscore"] = {k: sum(s[k] for s in bs) / len(bs) for k in ("precision", "recall", "f1")}
        summary["bertscore_encoder"] = metrics.BERTSCORE_ENCODER
        summary["bertscore_note"] = metrics.BERTSCORE_NOTE
    if records and all("decision" in r for r in records):
        decided = [metrics.extract_decision(r["prediction"]) for r in records]
        for r, d in zip(records, decided, strict=True):
            r["pred_decision"] = d
        summary["decision"] = metrics.classification_scores([r["decision"] for r in records], decided)
    return {**summary, "items": records}
