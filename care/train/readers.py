"""Readers: files on disk -> `Record`s, with every bad row counted by file and line.

Generic formats (JSONL, JSON, CSV, Parquet, a saved Hugging Face `datasets` folder, `.gz` text) go through one
column mapping; the official files in ../shared/data (see its MANIFEST) have dedicated readers that turn
their own shapes into query/response pairs.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from care.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class Record:
    """One training example: a user query and the assistant response, tagged with its domain."""

    id: str
    query: str
    response: str
    domain: str = "general"
    system: str | None = None  # None: the domain's prompt from care.domains at formatting time
    source: str = ""  # file or reader it came from
    stage: int = 1
    origin: str = ""  # "file:line" for error reports
    messages: list[dict[str, str]] | None = None  # multi-turn rows keep their whole conversation
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class BadRow:
    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


class BadRows:
    """Collects bad rows; `strict` turns the first one into a DataError naming its file and line."""

    def __init__(self, strict: bool = False) -> None:
        self.strict = strict
        self.rows: list[BadRow] = []

    def add(self, file: str | Path, line: int, reason: str) -> None:
        bad = BadRow(str(file), int(line), reason)
        if self.strict:
            raise DataError(f"Bad row at {bad}", path=file,
                            hint="Fix or remove the row, or run without --strict to skip bad rows")
        self.rows.append(bad)

    def summary(self, examples: int = 5) -> dict[str, Any]:
        by_file: dict[str, dict[str, Any]] = {}
        for b in self.rows:
            entry = by_file.setdefault(b.file, {"count": 0, "reasons": {}, "examples": []})
            entry["count"] += 1
            entry["reasons"][b.reason] = entry["reasons"].get(b.reason, 0) + 1
            if len(entry["examples"]) < examples:
                entry["examples"].append({"line": b.line, "reason": b.reason})
        return {"total": len(self.rows), "by_file": by_file}


# Column names we recognise when a source gives no mapping, by our field.
AUTO_COLUMNS: dict[str, tuple[str, ...]] = {
    "query": ("query", "instruction", "prompt", "question", "text", "input", "user"),
    "response": ("response", "output", "completion", "answer", "assistant", "target"),
    "domain": ("domain",),
    "system": ("system",),
    "id": ("id",),
    "messages": ("messages", "conversations"),
    "input": ("input", "context"),
}

_SURROGATE = re.compile("[\udc80-\udcff]")
PLACEHOLDER = re.compile(r"\{\{\s*([^{}]+?)\s*\}\}")


def _open_text(path: Path) -> io.TextIOBase:
    # surrogateescape keeps bad bytes visible (as lone surrogates) so we can count the row instead of crashing.
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="surrogateescape", newline="")
    return path.open("r", encoding="utf-8", errors="surrogateescape", newline="")


def _has_bad_utf8(value: Any) -> bool:
    if isinstance(value, str):
        return bool(_SURROGATE.search(value))
    if isinstance(value, dict):
        return any(_has_bad_utf8(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_bad_utf8(v) for v in value)
    return False


def _fmt(path: Path) -> str:
    name = path.name.lower()
    for suffix in (".gz",):
        name = name.removesuffix(suffix)
    if path.is_dir():
        return "hf"
    for ext, fmt in ((".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "json"), (".csv", "csv"),
                     (".tsv", "tsv"), (".parquet", "parquet")):
        if name.endswith(ext):
            return fmt
    raise DataError(f"Unknown data file type '{path.name}'", path=path,
                    hint="Use .jsonl, .json, .csv, .tsv, .parquet, a datasets folder, or set `reader:` in the source")


def iter_rows(path: Path, fmt: str | None = None) -> Iterator[tuple[int, Any]]:
    """(line number, raw row) for a generic file. Unparseable JSON lines come back as row None."""
    fmt = fmt or _fmt(path)
    if fmt == "jsonl":
        with _open_text(path) as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError:
                    yield n, None
    elif fmt == "json":
        with _open_text(path) as fh:
            try:
                data = json.load(fh)
            except json.JSONDecodeError as exc:
                # Some ".json" files are really JSON lines (e.g. MedMCQA's dev.json).
                fh.seek(0)
                first = fh.readline()
                try:
                    json.loads(first)
                except json.JSONDecodeError:
                    raise DataError(f"Not valid JSON: {exc.msg} at line {exc.lineno}", path=path,
                                    hint="Fix the file or save it as JSON lines (.jsonl)") from exc
                yield from iter_rows(path, "jsonl")
                return
        if isinstance(data, dict):
            # {"data": [...]} or {id: row, ...}
            rows = data.get("data") if isinstance(data.get("data"), list) else [
                ({"id": k} | v if isinstance(v, dict) else {"id": k, "value": v}) for k, v in data.items()]
        else:
            rows = data
        for n, row in enumerate(rows, 1):
            yield n, row
    elif fmt in ("csv", "tsv"):
        with _open_text(path) as fh:
            reader = csv.DictReader(fh, delimiter="\t" if fmt == "tsv" else ",")
            start = 2
            for row in reader:
                yield start, row  # physical line where the row starts (header is line 1)
                start = reader.line_num + 1
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        for n, row in enumerate(table.to_pylist(), 1):
            yield n, row
    elif fmt == "hf":
        from datasets import load_from_disk

        ds = load_from_disk(str(path))
        if hasattr(ds, "keys"):  # DatasetDict: take train
            ds = ds["train"] if "train" in ds else ds[next(iter(ds.keys()))]
        for n, row in enumerate(ds, 1):
            yield n, row
    else:
        raise DataError(f"Unknown data format '{fmt}'", path=path, hint="Use jsonl, json, csv, tsv, parquet or hf")


def _pick(row: dict[str, Any], field_name: str, columns: dict[str, str]) -> Any:
    if field_name in columns:
        return row.get(columns[field_name])
    for col in AUTO_COLUMNS.get(field_name, ()):
        if col in row and row[col] not in (None, ""):
            return row[col]
    return None


def _from_messages(msgs: Any) -> tuple[str | None, str | None, str | None, list[dict[str, str]] | None, str]:
    """(system, query, response, whole conversation, error)."""
    if not isinstance(msgs, list) or not msgs:
        return None, None, None, None, "messages is not a non-empty list"
    conv = []
    for m in msgs:
        if not isinstance(m, dict):
            return None, None, None, None, "a message is not an object"
        role = m.get("role") or m.get("from")
        content = m.get("content", m.get("value"))
        role = {"human": "user", "gpt": "assistant"}.get(role, role)
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            return None, None, None, None, f"bad message role/content ({role!r})"
        conv.append({"role": role, "content": content})
    if conv[-1]["role"] != "assistant":
        return None, None, None, None, "conversation does not end with an assistant message"
    system = conv[0]["content"] if conv[0]["role"] == "system" else None
    users = [m for m in conv if m["role"] == "user"]
    if not users:
        return None, None, None, None, "conversation has no user message"
    return system, users[-1]["content"], conv[-1]["content"], conv, ""


def records_from_rows(rows: Iterable[tuple[int, Any]], file: str, bad: BadRows, *, columns: dict[str, str] | None,
                      domain: str | None, stage: int, limit: int | None, source: str) -> list[Record]:
    """Generic mapping of raw rows to Records (the four seed formats load without code changes)."""
    columns = dict(columns or {})
    out: list[Record] = []
    for line, row in rows:
        if limit is not None and len(out) >= limit:
            break
        if row is None:
            bad.add(file, line, "not valid JSON")
            continue
        if not isinstance(row, dict):
            bad.add(file, line, "row is not an object")
            continue
        if _has_bad_utf8(row):
            bad.add(file, line, "non-UTF-8 bytes")
            continue
        missing = [c for c in columns.values() if c not in row]
        if missing:
            bad.add(file, line, f"missing column {missing[0]!r}")
            continue
        conv = None
        system = _pick(row, "system", columns)
        msgs = _pick(row, "messages", columns)
        if msgs is not None:
            m_system, query, response, conv, err = _from_messages(msgs)
            if err:
                bad.add(file, line, err)
                continue
            system = system or m_system
        else:
            query = _pick(row, "query", columns)
            response = _pick(row, "response", columns)
            extra = _pick(row, "input", columns) if "query" not in columns else None
            # instruction + input (Alpaca style): the input follows the instruction.
            if extra and isinstance(query, str) and extra != query and "instruction" in row:
                query = f"{query}\n\n{extra}"
        if query is None or (isinstance(query, str) and not query.strip()):
            bad.add(file, line, "empty or missing query")
            continue
        if response is None or (isinstance(response, str) and not response.strip()):
            bad.add(file, line, "empty or missing response")
            continue
        rid = _pick(row, "id", columns)
        dom = _pick(row, "domain", columns) or domain or "general"
        out.append(Record(id=str(rid if rid is not None else f"{Path(file).stem}:{line}"), query=str(query).strip(),
                          response=str(response).strip(), domain=str(dom).lower(), system=system, source=source,
                          stage=stage, origin=f"{file}:{line}", messages=conv))
    return out


# -- the official ../shared/data files ----------------------------------------------------------------------

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
        if not isinstance(row, dict) or _has_bad_utf8(row):
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
GENERIC = ("jsonl", "json", "csv", "tsv", "parquet", "hf")
# Default file per special reader inside ../shared/data, for sources that give a reader but no path.
SHARED_DEFAULTS = {
    "pubmedqa": "pubmedqa/ori_pqal.json",
    "medquad": "medquad/medquad.normalized.jsonl.gz",
    "bitext": "bitext_customer_support/Bitext_Sample_Customer_Support_Training_Dataset__4514rows__commit337b968.csv",
    "banking77": "banking77/train.csv",
    "medmcqa": "medmcqa/dev.json",
}


def read_source(path: Path | None, reader: str | None, bad: BadRows, *, columns: dict[str, str] | None = None,
                domain: str | None = None, stage: int = 1, limit: int | None = None,
                options: dict[str, Any] | None = None) -> list[Record]:
    """Load one source. `reader` picks a dedicated reader or a generic format; default: by file suffix."""
    options = options or {}
    if path is None:
        from care.paths import shared_data_dir

        shared = shared_data_dir()
        if reader not in SHARED_DEFAULTS or shared is None:
            raise DataError(f"Source with reader {reader!r} has no path", hint="Add `path:` to the source")
        path = shared / SHARED_DEFAULTS[reader]
    if not path.exists():
        raise DataError("Data file not found", path=path, hint="Check the source path in the recipe")
    if reader in SPECIAL_READERS:
        return SPECIAL_READERS[reader](path, bad, domain=domain, stage=stage, limit=limit, options=options)
    if reader is not None and reader not in GENERIC:
        names = ", ".join([*SPECIAL_READERS, *GENERIC])
        raise DataError(f"Unknown reader {reader!r}", path=path, hint=f"Use one of: {names}")
    if path.is_dir() and reader is None and not (path / "dataset_info.json").exists() \
            and not (path / "dataset_dict.json").exists():
        raise DataError("Folder is not a saved datasets folder", path=path,
                        hint="Point at a file, or a folder made by datasets' save_to_disk")
    return records_from_rows(iter_rows(path, reader), str(path), bad, columns=columns, domain=domain, stage=stage,
                             limit=limit, source=path.name)
