"""Dedicated readers for the official files in ../shared/data (see its MANIFEST): each turns its file's own
shape into query/response `Record`s, counting bad rows by file and line."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from care.errors import DataError
from care.train.formats import has_bad_utf8, iter_rows, records_from_rows
from care.train.records import BadRows, Record

PLACEHOLDER = re.compile(r"\{\{\s*([^{}]+?)\s*\}\}")


def read_pubmedqa(path: Path, bad: BadRows, *, domain: str | None, stage: int, limit: int | None,
                  options: dict[str, Any]) -> list[Record]:
    """PubMedQA `ori_pqal.json`: question + abstract contexts -> long answer and the yes/no/maybe decision.

    options.split: all (default) | train (the 500 train/CV PMIDs) | test (the 500 in test_ground_truth.json)."""
    split = options.get("split", "all")
    test_ids: set[str] = set()
    if split != "all":
        gt = path.parent / "test_ground_truth.json"
        if not gt.is_file():
            raise DataError("PubMedQA split needs test_ground_truth.json beside ori_pqal.json", path=gt,
                            hint="Keep the official folder intact or use split: all")
        test_ids = set(json.loads(gt.read_text(encoding="utf-8")))
    out: list[Record] = []
    for line, row in iter_rows(path, "json"):
        if limit is not None and len(out) >= limit:
            break
        pmid = str(row.get("id"))
        if (split == "train" and pmid in test_ids) or (split == "test" and pmid not in test_ids):
            continue
        question, contexts = row.get("QUESTION"), row.get("CONTEXTS") or []
        answer, decision = row.get("LONG_ANSWER"), row.get("final_decision")
        if not question or not answer or decision not in ("yes", "no", "maybe"):
            bad.add(path, line, "missing QUESTION, LONG_ANSWER or final_decision")
            continue
        context = "\n".join(str(c) for c in contexts)
        query = f"Context:\n{context}\n\nQuestion: {question}" if context else str(question)
        response = f"{answer.strip()}\nAnswer: {decision}"
        out.append(Record(id=f"pubmedqa-{pmid}", query=query, response=response, domain=domain or "medical",
                          source="pubmedqa", stage=stage, origin=f"{path}:{line}",
                          meta={"decision": decision}))
    return out


def read_bitext(path: Path, bad: BadRows, *, domain: str | None, stage: int, limit: int | None,
                options: dict[str, Any]) -> list[Record]:
    """Bitext customer-support CSV: instruction -> response.

    options.placeholders: keep (default, `{{Order Number}}` stays) | strip (braces removed: `Order Number`) |
    drop (rows with placeholders are left out, not counted as bad)."""
    mode = options.get("placeholders", "keep")
    if mode not in ("keep", "strip", "drop"):
        raise DataError(f"bitext placeholders option must be keep, strip or drop, got {mode!r}", path=path,
                        hint="Set options: {placeholders: keep}")
    rows = ((n, r) for n, r in iter_rows(path, "csv"))
    recs = records_from_rows(rows, str(path), bad, columns={"query": "instruction", "response": "response"},
                             domain=domain or "general", stage=stage, limit=None, source="bitext")
    out = []
    for r in recs:
        if limit is not None and len(out) >= limit:
            break
        if mode == "drop" and (PLACEHOLDER.search(r.response) or PLACEHOLDER.search(r.query)):
            continue
        if mode == "strip":
            r.query = PLACEHOLDER.sub(r"\1", r.query)
            r.response = PLACEHOLDER.sub(r"\1", r.response)
        r.id = f"bitext-{r.origin.rsplit(':', 1)[-1]}"
        out.append(r)
    return out


def read_banking77(path: Path, bad: BadRows, *, domain: str | None, stage: int, limit: int | None,
                   options: dict[str, Any]) -> list[Record]:
    """Banking77 CSV (text, category): real banking queries with an intent label and no response.

    The response is the intent as a short labelled answer ("Intent: card arrival"), which teaches intent
    recognition; the raw label is in `meta["intent"]` for domain classifiers."""
    rows = iter_rows(path, "csv")
    out = []
    for r in records_from_rows(rows, str(path), bad, columns={"query": "text", "response": "category"},
                               domain=domain or "banking", stage=stage, limit=limit, source="banking77"):
        r.meta["intent"] = r.response
        r.response = "Intent: " + r.response.replace("_", " ")
        r.id = f"banking77-{Path(path).stem}-{r.origin.rsplit(':', 1)[-1]}"
        out.append(r)
    return out


def read_medmcqa(path: Path, bad: BadRows, *, domain: str | None, stage: int, limit: int | None,
                 options: dict[str, Any]) -> list[Record]:
    """MedMCQA dev.json (JSON lines) as multiple-choice instructions: the answer letter and text, then the
    explanation when there is one."""
    out = []
    for line, row in iter_rows(path, "jsonl"):
        if limit is not None and len(out) >= limit:
            break
        if not isinstance(row, dict) or has_bad_utf8(row):
            bad.add(path, line, "not a valid JSON object")
            continue
        opts = [row.get(k) for k in ("opa", "opb", "opc", "opd")]
        cop = row.get("cop")
        if not row.get("question") or any(o is None for o in opts) or cop not in (1, 2, 3, 4):
            bad.add(path, line, "missing question, options or cop")
            continue
        letters = "ABCD"
        query = (f"{row['question'].strip()}\n" + "\n".join(f"{letters[i]}. {o}" for i, o in enumerate(opts))
                 + "\nAnswer with the letter of the correct option.")
        response = f"{letters[cop - 1]}. {opts[cop - 1]}"
        if row.get("exp"):
            response += f"\nExplanation: {str(row['exp']).strip()}"
        out.append(Record(id=f"medmcqa-{row.get('id', line)}", query=query, response=response,
                          domain=domain or "medical", source="medmcqa", stage=stage, origin=f"{path}:{line}",
                          meta={"subject": row.get("subject_name"), "answer": letters[cop - 1]}))
    return out


def read_medquad(path: Path, bad: BadRows, *, domain: str | None, stage: int, limit: int | None,
                 options: dict[str, Any]) -> list[Record]:
    """MedQuAD normalized JSON lines (query, response, domain=medical)."""
    recs = records_from_rows(iter_rows(path, "jsonl"), str(path), bad, columns={}, domain=domain or "medical",
                             stage=stage, limit=limit, source="medquad")
    for r in recs:
        r.id = f"medquad-{r.id}"
    return recs


SPECIAL_READERS = {
    "pubmedqa": read_pubmedqa,
    "bitext": read_bitext,
    "banking77": read_banking77,
    "medmcqa": read_medmcqa,
    "medquad": read_medquad,
}
# Default file per special reader inside ../shared/data, for sources that give a reader but no path.
SHARED_DEFAULTS = {
    "pubmedqa": "pubmedqa/ori_pqal.json",
    "medquad": "medquad/medquad.normalized.jsonl.gz",
    "bitext": "bitext_customer_support/Bitext_Sample_Customer_Support_Training_Dataset__4514rows__commit337b968.csv",
    "banking77": "banking77/train.csv",
    "medmcqa": "medmcqa/dev.json",
}
