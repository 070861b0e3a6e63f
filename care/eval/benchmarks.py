"""Multiple-choice medical benchmarks, read from the official files as published (see ../shared/data/MANIFEST.md).

Every loader returns `MCItem`s; `build_prompt` turns one into the lm-evaluation-harness MMLU-style prompt
("...\\nAnswer:") whose continuations " A", " B", ... are scored by log-likelihood. The prompt is plain
text, identical for every backend, so HF and GGUF scores of the same weights are comparable.
"""

from __future__ import annotations

import csv
import json
import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from care.errors import DataError, EvalError

log = logging.getLogger(__name__)

LETTERS = "ABCDEFGHIJ"

MMLU_MEDICAL_SUBJECTS = (
    "anatomy",
    "clinical_knowledge",
    "college_biology",
    "college_medicine",
    "medical_genetics",
    "professional_medicine",
)

# name -> (description, needs a user-supplied path)
BENCHMARKS: dict[str, str] = {
    "medmcqa": "MedMCQA dev (4,183 four-option questions, 21 subjects)",
    "pubmedqa": "PubMedQA PQA-L test (500 questions, yes/no/maybe as A/B/C, abstract as context)",
    "mmlu_medical": "MMLU medical subjects (6 subjects, 1,089 test questions; dev for k-shot)",
    "medqa": "MedQA-USMLE 4-option (jsonl: options/answer_idx or HF sent1/ending0-3/label; pass --medqa-file)",
}


@dataclass
class MCItem:
    id: str
    benchmark: str
    subject: str
    question: str
    options: list[str]
    answer: int  # 0-based index into options
    context: str = ""  # PubMedQA abstract
    shots: list[MCItem] = field(default_factory=list, repr=False)

    @property
    def answer_letter(self) -> str:
        return LETTERS[self.answer]

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("shots")
        return d


def _subject_title(subject: str) -> str:
    return subject.replace("_", " ")


def _format_question(item: MCItem) -> str:
    lines = []
    if item.context:
        lines.append(f"Abstract: {item.context}")
    lines.append(f"Question: {item.question}" if item.context else item.question)
    lines += [f"{LETTERS[i]}. {opt}" for i, opt in enumerate(item.options)]
    lines.append("Answer:")
    return "\n".join(lines)


def build_prompt(item: MCItem) -> str:
    """The harness-style prompt ending in 'Answer:'; few-shot examples (if any) come first."""
    header = f"The following are multiple choice questions (with answers) about {_subject_title(item.subject)}.\n\n"
    if item.benchmark == "pubmedqa":
        header = ("The following are questions about medical research abstracts, answered yes, no or maybe "
                  "(with answers).\n\n")
    parts = [header]
    for shot in item.shots:
        parts.append(f"{_format_question(shot)} {shot.answer_letter}\n\n")
    parts.append(_format_question(item))
    return "".join(parts)


def continuations(item: MCItem) -> list[str]:
    return [f" {LETTERS[i]}" for i in range(len(item.options))]


# -- loaders --------------------------------------------------------------------------------------------

def _need(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataError(f"{what} file not found", path=path,
                        hint="Point --data-dir at the datasets folder (see ../shared/data/MANIFEST.md)")
    return path


def _bad(path: Path, line: int | str, what: str, hint: str) -> DataError:
    return DataError(f"Wrong data format at {path.name}:{line}: {what}", path=path, hint=hint)


def _json_lines(path: Path, hint: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of a JSON-lines file, read by the training data layer (care.train.readers)."""
    from care.train.readers import iter_rows

    for n, row in iter_rows(path, "jsonl"):
        if not isinstance(row, dict):
            raise _bad(path, n, "not a JSON object" if row is not None else "not JSON", hint)
        yield n, row


def load_medmcqa(data_dir: Path) -> list[MCItem]:
    """medmcqa/dev.json: JSON lines with opa..opd and cop (1-based correct option)."""
    path = _need(data_dir / "medmcqa" / "dev.json", "MedMCQA dev.json")
    hint = "Expected the official MedMCQA JSON lines (id, question, opa, opb, opc, opd, cop 1..4)"
    items = []
    for n, row in _json_lines(path, hint):
        try:
            cop = int(row["cop"])
            opts = [str(row[k]) for k in ("opa", "opb", "opc", "opd")]
            question = str(row["question"])
            rid = str(row.get("id") or f"medmcqa-{n}")
        except (KeyError, TypeError, ValueError) as exc:
            raise _bad(path, n, f"{type(exc).__name__} {exc}", hint) from exc
        if not 1 <= cop <= 4:
            raise _bad(path, n, f"cop={cop} is not 1..4", hint)
        items.append(MCItem(rid, "medmcqa", row.get("subject_name") or "unknown", question, opts, cop - 1))
    return items


PUBMEDQA_CHOICES = ("yes", "no", "maybe")


def load_pubmedqa(data_dir: Path, split: str = "test") -> list[MCItem]:
    """PQA-L: ori_pqal.json (1,000 items keyed by PMID) + test_ground_truth.json (the 500 test PMIDs).

    split="test" gives the official 500 test items, "train" the other 500 (used for k-shot examples)."""
    folder = data_dir / "pubmedqa"
    ori = _need(folder / "ori_pqal.json", "PubMedQA ori_pqal.json")
    gt_path = _need(folder / "test_ground_truth.json", "PubMedQA test_ground_truth.json")
    hint = "Expected the official PubMedQA ori_pqal.json (PMID -> QUESTION, CONTEXTS, final_decision)"
    try:
        data = json.loads(ori.read_text(encoding="utf-8"))
        truth = json.loads(gt_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise _bad(ori, exc.lineno, str(exc), hint) from exc
    if not isinstance(data, dict) or not isinstance(truth, dict):
        raise _bad(ori, 1, "top level is not a JSON object keyed by PMID", hint)
    pmids = [p for p in data if (p in truth) == (split == "test")]
    items = []
    for pmid in pmids:
        row = data[pmid]
        try:
            decision = truth.get(pmid, row.get("final_decision"))
            answer = PUBMEDQA_CHOICES.index(str(decision).strip().lower())
            context = " ".join(str(c) for c in row["CONTEXTS"])
            question = str(row["QUESTION"])
        except (KeyError, TypeError, ValueError) as exc:
            raise _bad(ori, f"PMID {pmid}", f"{type(exc).__name__} {exc}", hint) from exc
        items.append(MCItem(pmid, "pubmedqa", "pubmedqa", question, list(PUBMEDQA_CHOICES), answer, context=context))
    return items


def pubmedqa_long_answers(data_dir: Path, split: str = "test") -> list[dict]:
    """PubMedQA test items as generation pairs: query (abstract + question) -> LONG_ANSWER, with the decision."""
    folder = data_dir / "pubmedqa"
    data = json.loads(_need(folder / "ori_pqal.json", "PubMedQA ori_pqal.json").read_text(encoding="utf-8"))
    items = load_pubmedqa(data_dir, split)
    return [
        {"id": it.id, "query": f"{it.context}\n\nQuestion: {it.question}\nAnswer yes, no or maybe, then explain.",
         "response": str(data[it.id].get("LONG_ANSWER", "")), "decision": PUBMEDQA_CHOICES[it.answer]}
        for it in items
    ]


def _read_mmlu_csv(path: Path, subject: str, kind: str) -> list[MCItem]:
    hint = "Expected the official headerless MMLU CSV: question,A,B,C,D,answer_letter"
    items = []
    with path.open(encoding="utf-8", newline="") as fh:
        for n, row in enumerate(csv.reader(fh), 1):
            if not row:
                continue
            if len(row) != 6 or row[5].strip() not in LETTERS[:4]:
                raise _bad(path, n, f"{len(row)} columns, answer {row[-1]!r}", hint)
            items.append(MCItem(f"{subject}_{kind}_{n}", "mmlu_medical", subject, row[0], row[1:5],
                                LETTERS.index(row[5].strip())))
    return items


def load_mmlu_medical(data_dir: Path, subjects: Sequence[str] = MMLU_MEDICAL_SUBJECTS, kind: str = "test"
                      ) -> list[MCItem]:
    folder = data_dir / "mmlu_medical" / ("test" if kind == "test" else "dev_hendrycks_2020")
    items = []
    for subject in subjects:
        items += _read_mmlu_csv(_need(folder / f"{subject}_{kind}.csv", f"MMLU {subject} {kind}"), subject, kind)
    return items


MEDQA_HINT = ("Expected MedQA-USMLE 4-option JSON lines, either the original shape (question, options {A..D}, "
              "answer_idx) or the Hugging Face one that lm-evaluation-harness's medqa_4options reads "
              "(sent1, ending0..ending3, label 0..3)")


def _medqa_original(row: dict[str, Any]) -> tuple[str, list[str], int]:
    """The original shape: question, options {A: .., B: ..} (or a list), answer_idx (a letter)."""
    options = row["options"]
    letters = sorted(options) if isinstance(options, dict) else list(LETTERS[: len(options)])
    opts = [str(options[k]) for k in letters] if isinstance(options, dict) else [str(o) for o in options]
    return str(row["question"]), opts, letters.index(str(row["answer_idx"]).strip())


def _medqa_hf(row: dict[str, Any]) -> tuple[str, list[str], int]:
    """The Hugging Face shape (GBaker/MedQA-USMLE-4-options-hf): sent1 the question, ending0..ending3 the
    options A..D, label the 0-based correct ending. sent2 (empty there) is left out, as the harness does."""
    for key in ("sent1", "ending0", "ending1", "ending2", "ending3", "label"):
        if key not in row:
            raise KeyError(key)
    opts = [str(row[f"ending{i}"]) for i in range(4)]
    while f"ending{len(opts)}" in row and len(opts) < len(LETTERS):  # a 5-option file reads the same way
        opts.append(str(row[f"ending{len(opts)}"]))
    label = row["label"]
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(opts):
        raise ValueError(f"label={label!r} is not 0..{len(opts) - 1}")
    return str(row["sent1"]), opts, label


def _is_medqa_hf(row: dict[str, Any]) -> bool:
    return "question" not in row and ("sent1" in row or "ending0" in row)


def load_medqa(path: Path) -> list[MCItem]:
    """MedQA-USMLE 4-option JSON lines in either public shape, told apart by the first row: the original
    (question, options {A: .., B: ..}, answer_idx a letter) or Hugging Face's (sent1, ending0..ending3, label
    0..3). Both become the same items: options lettered A.. in order, `answer` the index of the correct one."""
    path = Path(path)
    if not path.is_file():
        raise DataError("MedQA file not found", path=path,
                        hint="Pass the 4-option MedQA-USMLE jsonl with --medqa-file (it is not in ../shared/data)")
    items = []
    parse = None
    for n, row in _json_lines(path, MEDQA_HINT):
        if parse is None:
            parse = _medqa_hf if _is_medqa_hf(row) else _medqa_original
        shape = "Hugging Face" if parse is _medqa_hf else "original"
        try:
            question, opts, answer = parse(row)
        except KeyError as exc:
            raise _bad(path, n, f"missing field {exc} ({shape} MedQA shape)", MEDQA_HINT) from exc
        except (TypeError, ValueError, AttributeError) as exc:
            raise _bad(path, n, f"{type(exc).__name__} {exc}", MEDQA_HINT) from exc
        items.append(MCItem(str(row.get("id", f"medqa-{n}")), "medqa", row.get("meta_info") or "usmle",
                            question, opts, answer))
    return items


# -- selection ------------------------------------------------------------------------------------------

def parse_bench_names(text: str) -> list[str]:
    names = [n.strip().lower().replace("-", "_") for n in text.split(",") if n.strip()]
    for name in names:
        if name not in BENCHMARKS:
            raise EvalError(f"Unknown benchmark '{name}'", hint=f"Choose from: {', '.join(BENCHMARKS)}")
    if not names:
        raise EvalError("No benchmark given", hint=f"Pass --bench with some of: {', '.join(BENCHMARKS)}")
    return names


def subsample(items: list[MCItem], limit: int | None, seed: int) -> list[MCItem]:
    """A seeded random subset of `limit` items, kept in file order (same seed -> same item ids)."""
    if not limit or limit >= len(items):
        return list(items)
    rng = random.Random(seed)
    keep = sorted(rng.sample(range(len(items)), limit))
    return [items[i] for i in keep]


def load_benchmark(name: str, data_dir: Path | None, *, shots: int = 0, limit: int | None = None, seed: int = 0,
                   medqa_file: Path | None = None) -> list[MCItem]:
    """Items of one benchmark, subsampled, each carrying its `shots` few-shot examples.

    Few-shot examples never come from the evaluated items: MMLU uses its dev files (5 per subject), PubMedQA
    the official train/CV pool; MedMCQA and MedQA (no train split here) set aside the first `shots` items
    of a seeded shuffle and evaluate the rest."""
    (name,) = parse_bench_names(name)
    if name == "medqa":
        if medqa_file is None:
            raise EvalError("The medqa benchmark needs a file", hint="Pass --medqa-file PATH (MedQA-USMLE 4-option jsonl)")
        items = load_medqa(medqa_file)
    else:
        if data_dir is None:
            raise DataError("The datasets folder was not found",
                            hint="Pass --data-dir (the folder with MANIFEST.md) or set CARE_SHARED_DATA")
        data_dir = Path(data_dir)
        items = {"medmcqa": load_medmcqa, "pubmedqa": load_pubmedqa, "mmlu_medical": load_mmlu_medical}[name](data_dir)
    if shots < 0:
        raise EvalError(f"--shots must be >= 0, got {shots}")
    if shots:
        rng = random.Random(seed)
        if name == "mmlu_medical":
            if shots > 5:
                raise EvalError(f"MMLU has 5 dev examples per subject; --shots {shots} is too many",
                                hint="Use --shots 0..5")
            dev = load_mmlu_medical(Path(data_dir), kind="dev")
            by_subject: dict[str, list[MCItem]] = {}
            for d in dev:
                by_subject.setdefault(d.subject, []).append(d)
            for it in items:
                it.shots = by_subject.get(it.subject, [])[:shots]
        else:
            pool = load_pubmedqa(Path(data_dir), "train") if name == "pubmedqa" else None
            if pool is None:
                order = list(range(len(items)))
                rng.shuffle(order)
                held = set(order[:shots])
                pool = [items[i] for i in sorted(held)]
                items = [it for i, it in enumerate(items) if i not in held]
            chosen = rng.sample(pool, min(shots, len(pool)))
            for it in items:
                it.shots = chosen
    return subsample(items, limit, seed)
