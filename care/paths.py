"""Per-user folders (XDG via platformdirs). CARE_HOME overrides them all, which tests use."""

from __future__ import annotations

import os
from pathlib import Path


def _base(kind: str) -> Path:
    home = os.environ.get("CARE_HOME")
    if home:
        path = Path(home) / kind
    else:
        import platformdirs

        path = Path(
            platformdirs.user_data_dir("care") if kind == "data"
            else platformdirs.user_cache_dir("care") if kind == "cache"
            else platformdirs.user_config_dir("care")
        )
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_dir() -> Path:
    """Chat history, recent models, fetched tools."""
    return _base("data")


def cache_dir() -> Path:
    return _base("cache")


def config_dir() -> Path:
    """User-editable settings, e.g. clinic safety rules overriding the packaged ones."""
    return _base("config")


def shared_data_dir() -> Path | None:
    """The public datasets folder: $CARE_SHARED_DATA, else ../shared/data beside the checkout."""
    env = os.environ.get("CARE_SHARED_DATA")
    candidates = [Path(env)] if env else []
    repo = Path(__file__).resolve().parent.parent
    candidates += [repo.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    for cand in candidates:
        if (cand / "MANIFEST.md").is_file():
            return cand
    return None
