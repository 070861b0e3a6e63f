"""Readers for the triage labelled sets and the public sets, with every train / held-out rule in one place.

Used by scripts/train_triage.py (training) and bench/triage.py (measuring), so both split the same way:
- the labelled sets (care/data/triage/DATA.md): train*.jsonl teach, dev*.jsonl (other authors) measure;
  bench/heldout/ (a third author, never read by the developers) is measured and reported apart;
- the consumer health questions (../shared/data/consumer_health_questions, labelled by id in
  care/data/triage/chq_labels.jsonl): crc32(id) even -> train, odd -> dev;
- Banking77 by its official train/test files; Bitext by crc32(text) (even: train, odd: held out); MedQuAD
  by crc32(focus), so one condition's templated questions never sit on both sides (MedQuAD's questions are
  templated, "What is (are) X ?": a row about templates, not about real users).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

from care.errors import DataError

CATEGORIES = (
    "chest_pain", "stroke", "difficulty_breathing", "severe_bleeding", "suicidal_thoughts", "overdose_poisoning",
    "pregnancy_emergency", "unconscious_or_seizure", "severe_allergic_reaction", "head_injury_trauma", "burns",
    "bites_stings", "glucose_emergency", "sepsis_meningitis", "young_infant", "child_danger_signs",
    "surgical_emergency", "heat_stroke", "drowning", "severe_malaria", "violence_threat",
)
LANGS = ("en", "fr", "es", "pt", "sw", "hi", "bn")
# Kinds of labelled negatives that are about health (domain "medical"); the others are everyday chat.
MEDICAL_NEGATIVE_KINDS = frozenset({"general_question", "mild_symptom", "past_history", "pharmacy_warning",
                                    "negated", "resolved", "medication_question", "hypothetical",
                                    "other_past_or_news", "medical_info"})


@dataclass
class Row:
    text: str
    emergency: bool
    category: str | None
    lang: str
    kind: str
    script: str = "native"
    context: tuple[str, ...] = ()  # earlier user messages of the chat, oldest first

    @property
    def messages(self) -> list[str]:
        return [*self.context, self.text]

    @property
    def group(self) -> str:
        """The language as reported: en ... bn, with "-latin" for romanised Hindi / Bangla."""
        return f"{self.lang}-latin" if self.script == "latin" and self.lang in ("hi", "bn") else self.lang


def labelled_dir() -> Path:
    from importlib import resources

    return Path(str(resources.files("care") / "data" / "triage"))


def labelled_files(split: str) -> list[Path]:
    """train*.jsonl or dev*.jsonl of the packaged folder."""
    return sorted(labelled_dir().glob(f"{split}*.jsonl"))


def read_split(split: str) -> list[Row]:
    return [r for path in labelled_files(split) for r in read_labelled(path)]


def heldout_path() -> Path:
    return Path(__file__).resolve().parents[3] / "bench" / "heldout" / "triage_heldout.jsonl"


def read_labelled(path: Path) -> list[Row]:
    """One labelled set (care/data/triage/DATA.md): {"text","emergency","category"|null,"lang","kind",
    "script","context"} per line."""
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DataError(f"Cannot read the labelled triage set: {exc.strerror}", path=path,
                        hint="Check the path") from exc
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            lang = str(d.get("lang", "en"))
            lang = "en" if lang == "mixed" else lang  # the first sets' code-mixed EN/FR/ES rows
            row = Row(str(d["text"]), bool(d["emergency"]), d.get("category"), lang, str(d.get("kind", "")),
                      str(d.get("script") or "native"), tuple(str(c) for c in d.get("context") or ()))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise DataError(f"Bad row at line {i}: {exc}", path=path,
                            hint='Each line: {"text", "emergency", "category", "lang", "kind"}') from exc
        if row.emergency and row.category not in CATEGORIES:
            raise DataError(f"Line {i}: unknown category {row.category!r}", path=path,
                            hint="Use one of the ids in care.runtime.triage.data.CATEGORIES")
        rows.append(row)
    return rows


def _held_out(key: str) -> bool:
    return zlib.crc32(key.encode("utf-8")) % 2 == 1


def chq(shared: Path, split: str) -> list[Row]:
    """The labelled consumer health questions of one split ("train": even crc32(id), "dev": odd).
    Uncertain labels are kept with their label (an emergency a clinician might call either way is one)."""
    labels_path = labelled_dir() / "chq_labels.jsonl"
    labels = {}
    for i, line in enumerate(labels_path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                d = json.loads(line)
                labels[d["id"]] = d
            except (json.JSONDecodeError, KeyError) as exc:
                raise DataError(f"Bad label at line {i}: {exc}", path=labels_path, hint='{"id", "emergency", ...}') from exc
    path = shared / "consumer_health_questions" / "chq.jsonl"
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        d = json.loads(line)
        label = labels.get(d["id"])
        if label is None:
            raise DataError(f"Question {d['id']} has no label", path=labels_path,
                            hint="Label every question of chq.jsonl (care/data/triage/DATA.md)")
        if _held_out(d["id"]) == (split == "dev"):
            rows.append(Row(str(d["text"]), bool(label["emergency"]), label.get("category"), "en",
                            str(label.get("kind", "general_question"))))
    return rows


def banking77(shared: Path, split: str) -> list[str]:
    text = (shared / "banking77" / f"{split}.csv").read_text(encoding="utf-8")
    return [r["text"] for r in csv.DictReader(io.StringIO(text))]


def bitext(shared: Path, held_out: bool) -> list[str]:
    folder = shared / "bitext_customer_support"
    path = next(folder.glob("Bitext_*.csv"))
    rows = csv.DictReader(io.StringIO(path.read_text(encoding="utf-8")))
    return [r["instruction"] for r in rows if _held_out(r["instruction"]) == held_out]


def medquad(shared: Path, held_out: bool) -> list[str]:
    with gzip.open(shared / "medquad" / "medquad.normalized.jsonl.gz", "rt", encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    return [r["query"] for r in rows if _held_out(str(r.get("focus") or r["query"])) == held_out]
