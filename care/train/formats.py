"""Generic data files -> raw rows -> `Record`s, through one column mapping.

JSONL, JSON, CSV/TSV, Parquet, a saved Hugging Face `datasets` folder and `.gz` text; bad bytes stay visible
(as lone surrogates) so the row is counted as bad instead of crashing the load.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from care.errors import DataError
from care.train.records import BadRows, Record

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
# The formats iter_rows reads (a source's `reader:` may name one of them).
GENERIC = ("jsonl", "json", "csv", "tsv", "parquet", "hf")


def _open_text(path: Path) -> io.TextIOBase:
    # surrogateescape keeps bad bytes visible (as lone surrogates) so we can count the row instead of crashing.
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="surrogateescape", newline="")
    return path.open("r", encoding="utf-8", errors="surrogateescape", newline="")


def has_bad_utf8(value: Any) -> bool:
    if isinstance(value, str):
        return bool(_SURROGATE.search(value))
    if isinstance(value, dict):
        return any(has_bad_utf8(v) for v in value.values())
    if isinstance(value, list):
        return any(has_bad_utf8(v) for v in value)
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
        if has_bad_utf8(row):
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
