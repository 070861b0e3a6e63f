"""Readers: files on disk -> `Record`s, with every bad row counted by file and line; `read_source` is the one
entry point.

Generic formats (JSONL, JSON, CSV, Parquet, a saved Hugging Face `datasets` folder, `.gz` text) go through one
column mapping (care.train.formats); the official files in ../shared/data (see its MANIFEST) have dedicated
readers that turn their own shapes into query/response pairs (care.train.shared_readers); `Record` and
`BadRows` live in care.train.records. Their public names are re-exported here, where callers import them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from care.errors import DataError
from care.train.formats import AUTO_COLUMNS, GENERIC, iter_rows, records_from_rows
from care.train.records import BadRow, BadRows, Record
from care.train.shared_readers import SHARED_DEFAULTS, SPECIAL_READERS

__all__ = ["AUTO_COLUMNS", "GENERIC", "SHARED_DEFAULTS", "SPECIAL_READERS", "BadRow", "BadRows", "Record",
           "iter_rows", "read_source", "records_from_rows"]


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
