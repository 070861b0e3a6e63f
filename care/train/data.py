"""Multi-domain training data: load sources, dedupe, balance (CARE), cap/weight, split, two-stage mixing.

CARE balances domains by downsampling each to the smallest one (seeded). Med-Nirvana's dual-stage mixed
fine-tuning trains stage 1 on its data, then stage 2 on its own data plus a fraction k of stage-1 data so
the model does not forget stage 1.
"""

from __future__ import annotations

import logging
import random
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from care.errors import DataError
from care.train.readers import read_source
from care.train.records import BadRow, BadRows, Record

__all__ = ["Record", "BadRow", "BadRows", "DataBundle", "Stage", "read_source", "load_sources", "dedupe", "balance",
           "cap_and_weight", "split_stratified", "mix_stages", "build_data", "domain_counts"]

log = logging.getLogger(__name__)


def domain_counts(records: Sequence[Record]) -> dict[str, int]:
    return dict(sorted(Counter(r.domain for r in records).items()))


def _by_domain(records: Sequence[Record]) -> dict[str, list[Record]]:
    groups: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        groups[r.domain].append(r)
    return dict(sorted(groups.items()))


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


def dedupe(records: Sequence[Record]) -> list[Record]:
    """Drop exact (query, response) duplicates after folding case and whitespace; the first one stays."""
    seen: set[tuple[str, str]] = set()
    out = []
    for r in records:
        key = (_norm(r.query), _norm(r.response))
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def _sample(items: list[Record], n: int, rng: random.Random) -> list[Record]:
    """n items chosen by rng, kept in their original order (so the data file order still means something)."""
    if n >= len(items):
        return list(items)
    keep = set(rng.sample(range(len(items)), n))
    return [x for i, x in enumerate(items) if i in keep]


def balance(records: Sequence[Record], seed: int = 42) -> list[Record]:
    """CARE's balance: every domain downsampled to the size of the smallest domain, seeded."""
    groups = _by_domain(records)
    if not groups:
        return []
    smallest = min(len(v) for v in groups.values())
    rng = random.Random(seed)
    return [r for d in groups for r in _sample(groups[d], smallest, rng)]


def cap_and_weight(records: Sequence[Record], caps: dict[str, int] | None = None,
                   weights: dict[str, float] | None = None, seed: int = 42) -> list[Record]:
    """Per-domain weights (row counts relative to the smallest domain, 1.0 = as many as the smallest; a domain
    never gains rows, it can only lose them) then per-domain caps (maximum rows)."""
    caps, weights = caps or {}, weights or {}
    groups = _by_domain(records)
    if not groups:
        return []
    rng = random.Random(seed + 1)
    smallest = min(len(v) for v in groups.values())
    out = []
    for d, items in groups.items():
        n = len(items)
        if d in weights:
            n = min(n, max(1, round(smallest * float(weights[d]))))
        if d in caps and caps[d] is not None:
            n = min(n, int(caps[d]))
        out.extend(_sample(items, n, rng))
    return out


def split_stratified(records: Sequence[Record], val_fraction: float, seed: int = 42
                     ) -> tuple[list[Record], list[Record]]:
    """Train/validation split with the same fraction inside every domain (at least one validation row per
    domain that has two or more rows, when val_fraction > 0)."""
    if val_fraction <= 0:
        return list(records), []
    rng = random.Random(seed + 2)
    train, val = [], []
    for items in _by_domain(records).values():
        n_val = round(len(items) * val_fraction)
        if n_val == 0 and len(items) >= 2:
            n_val = 1
        idx = list(range(len(items)))
        rng.shuffle(idx)
        val_idx = set(idx[:n_val])
        for i, r in enumerate(items):
            (val if i in val_idx else train).append(r)
    return train, val


def mix_stages(stage1: Sequence[Record], stage2: Sequence[Record], k: float, seed: int = 42) -> list[Record]:
    """Stage-2 training set: all stage-2 rows plus a seeded fraction k of stage-1 rows (Med-Nirvana)."""
    if not 0 <= k <= 1:
        raise DataError(f"data.stages.mix_k must be between 0 and 1, got {k}", hint="e.g. mix_k: 0.2")
    rng = random.Random(seed + 3)
    replay = _sample(list(stage1), round(len(stage1) * k), rng)
    mixed = list(stage2) + replay
    rng.shuffle(mixed)
    return mixed


@dataclass
class Stage:
    index: int
    train: list[Record]
    val: list[Record]


@dataclass
class DataBundle:
    stages: list[Stage]
    bad: BadRows
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def train(self) -> list[Record]:
        return self.stages[-1].train

    @property
    def val(self) -> list[Record]:
        return self.stages[-1].val


def load_sources(sources: Sequence[dict[str, Any]], bad: BadRows, resolve=lambda p: Path(p)) -> list[Record]:
    records: list[Record] = []
    for src in sources:
        path = resolve(src["path"]) if src.get("path") else None
        recs = read_source(path, src.get("reader"), bad, columns=src.get("columns"), domain=src.get("domain"),
                           stage=int(src.get("stage", 1)), limit=src.get("limit"), options=src.get("options"))
        log.info("%s: %d rows", path or src.get("reader"), len(recs))
        records.extend(recs)
    return records


def _prepare(records: list[Record], data_cfg: dict[str, Any], seed: int) -> tuple[list[Record], dict[str, Any]]:
    rep: dict[str, Any] = {"loaded": domain_counts(records)}
    if data_cfg.get("dedupe", True):
        records = dedupe(records)
        rep["after_dedupe"] = domain_counts(records)
    if data_cfg.get("balance") == "downsample":
        records = balance(records, seed)
        rep["after_balance"] = domain_counts(records)
    if data_cfg.get("caps") or data_cfg.get("weights"):
        records = cap_and_weight(records, data_cfg.get("caps"), data_cfg.get("weights"), seed)
        rep["after_caps_weights"] = domain_counts(records)
    return records, rep


def build_data(data_cfg: dict[str, Any], strict: bool = False, resolve=lambda p: Path(p),
               records: list[Record] | None = None) -> DataBundle:
    """Everything between the recipe's `data` section and train/validation lists per stage.

    Length filtering needs the tokenizer and happens in care.train.formatting (it adds to the same bad rows)."""
    bad = BadRows(strict=strict)
    if records is None:
        if not data_cfg.get("sources"):
            raise DataError("The recipe has no data sources", hint="Add data.sources with at least one path")
        records = load_sources(data_cfg["sources"], bad, resolve)
    if not records:
        raise DataError("No usable rows in the data sources", hint="Check the files and column mapping; "
                        f"{len(bad.rows)} bad rows were skipped (see the data report)")
    seed = int(data_cfg.get("seed", 42))
    vf = float(data_cfg.get("val_fraction") or 0)
    stages_cfg = data_cfg.get("stages") or None
    report: dict[str, Any] = {"sources": [str(s.get("path") or s.get("reader")) for s in data_cfg.get("sources", [])]}
    stage_ids = sorted({r.stage for r in records})
    if stages_cfg and len(stage_ids) != 2:
        raise DataError(f"Two-stage mixing needs sources for stages 1 and 2, found stages {stage_ids}",
                        hint="Set `stage: 2` on the stage-2 sources")
    if not stages_cfg and len(stage_ids) > 1:
        raise DataError("Sources name several stages but data.stages is not set",
                        hint="Add data.stages: {mix_k: 0.2} or remove `stage:` from the sources")
    stages: list[Stage] = []
    if not stages_cfg:
        prepared, rep = _prepare(records, data_cfg, seed)
        train, val = split_stratified(prepared, vf, seed)
        stages.append(Stage(1, train, val))
        report["stages"] = [rep | {"train": domain_counts(train), "val": domain_counts(val)}]
    else:
        k = float(stages_cfg.get("mix_k", 0.2))
        s1, rep1 = _prepare([r for r in records if r.stage == stage_ids[0]], data_cfg, seed)
        s2, rep2 = _prepare([r for r in records if r.stage == stage_ids[1]], data_cfg, seed)
        tr1, va1 = split_stratified(s1, vf, seed)
        tr2, va2 = split_stratified(s2, vf, seed)
        mixed = mix_stages(tr1, tr2, k, seed)
        # Stage-2 validation watches both: its own rows and the stage-1 rows it must not forget.
        stages = [Stage(1, tr1, va1), Stage(2, mixed, va2 + va1)]
        report["mix_k"] = k
        report["stages"] = [rep1 | {"train": domain_counts(tr1), "val": domain_counts(va1)},
                            rep2 | {"train": domain_counts(mixed), "val": domain_counts(va2 + va1),
                                    "replayed_from_stage1": round(len(tr1) * k)}]
    report["bad_rows"] = bad.summary()
    return DataBundle(stages=stages, bad=bad, report=report)
