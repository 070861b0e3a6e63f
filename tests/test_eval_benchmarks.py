"""Loaders read the official files in ../shared/data; row counts are checked against its MANIFEST.md."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter

import pytest

from care.errors import DataError, EvalError
from care.eval import benchmarks as B


def _manifest_row(shared_data, folder: str) -> str:
    text = (shared_data / "MANIFEST.md").read_text(encoding="utf-8")
    row = next(line for line in text.splitlines() if line.startswith(f"| `{folder}/`"))
    return row.split("|")[4]  # the "rows" column


def _ints(text: str) -> list[int]:
    return [int(x.replace(",", "")) for x in re.findall(r"\d[\d,]*", text)]


def test_medmcqa_rows_match_manifest(shared_data):
    (rows,) = _ints(_manifest_row(shared_data, "medmcqa"))
    items = B.load_medmcqa(shared_data)
    assert len(items) == rows
    assert len({it.subject for it in items}) == 21  # "21 subjects" in the MANIFEST formats section
    assert all(len(it.options) == 4 and 0 <= it.answer < 4 for it in items)
    first = json.loads((shared_data / "medmcqa" / "dev.json").open().readline())
    assert items[0].id == first["id"] and items[0].answer == first["cop"] - 1


def test_pubmedqa_rows_match_manifest(shared_data):
    total, test, pool = _ints(_manifest_row(shared_data, "pubmedqa"))
    items, train = B.load_pubmedqa(shared_data), B.load_pubmedqa(shared_data, "train")
    assert (len(items), len(train), len(items) + len(train)) == (test, pool, total)
    assert not {it.id for it in items} & {it.id for it in train}
    text = (shared_data / "MANIFEST.md").read_text(encoding="utf-8")
    yes, no, maybe = _ints(re.search(r"Labels overall: (.*)\.", text).group(1))
    labels = Counter(it.options[it.answer] for it in items + train)
    assert labels == {"yes": yes, "no": no, "maybe": maybe}
    assert items[0].context and items[0].options == ["yes", "no", "maybe"]
    assert "Abstract:" in B.build_prompt(items[0]) and B.build_prompt(items[0]).endswith("Answer:")


def test_mmlu_medical_rows_match_manifest(shared_data):
    test_rows, dev_rows, per_subject = _ints(_manifest_row(shared_data, "mmlu_medical"))
    test, dev = B.load_mmlu_medical(shared_data), B.load_mmlu_medical(shared_data, kind="dev")
    assert (len(test), len(dev)) == (test_rows, dev_rows)
    assert Counter(d.subject for d in dev) == dict.fromkeys(B.MMLU_MEDICAL_SUBJECTS, per_subject)


def test_kshot_examples_never_come_from_evaluated_items(shared_data):
    mmlu = B.load_benchmark("mmlu_medical", shared_data, shots=3, limit=20, seed=1)
    for it in mmlu:
        assert len(it.shots) == 3 and {s.subject for s in it.shots} == {it.subject}
        prompt = B.build_prompt(it)
        assert prompt.count("Answer:") == 4 and f"Answer: {it.shots[0].answer_letter}\n\n" in prompt
    med = B.load_benchmark("medmcqa", shared_data, shots=2, seed=3)
    assert len(med) == len(B.load_medmcqa(shared_data)) - 2
    assert not {s.id for s in med[0].shots} & {it.id for it in med}
    pub = B.load_benchmark("pubmedqa", shared_data, shots=1, limit=5)
    assert pub[0].shots[0].id not in {it.id for it in B.load_pubmedqa(shared_data)}


def test_subsample_is_seeded_and_ordered(shared_data):
    a = B.load_benchmark("medmcqa", shared_data, limit=30, seed=7)
    b = B.load_benchmark("medmcqa", shared_data, limit=30, seed=7)
    c = B.load_benchmark("medmcqa", shared_data, limit=30, seed=8)
    assert [x.id for x in a] == [x.id for x in b] != [x.id for x in c]
    order = {it.id: i for i, it in enumerate(B.load_medmcqa(shared_data))}
    assert [order[x.id] for x in a] == sorted(order[x.id] for x in a)


def test_medqa_loader(tmp_path):
    f = tmp_path / "medqa.jsonl"
    rows = [{"question": "Q1?", "options": {"A": "a", "B": "b", "C": "c", "D": "d"}, "answer_idx": "C"},
            {"question": "Q2?", "options": {"B": "b", "A": "a", "D": "d", "C": "c"}, "answer_idx": "A",
             "meta_info": "step1"}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    items = B.load_benchmark("medqa", None, medqa_file=f)
    assert [(it.options, it.answer_letter) for it in items] == [(["a", "b", "c", "d"], "C"), (["a", "b", "c", "d"], "A")]
    assert items[1].subject == "step1"
    f.write_text('{"question": "Q", "options": {"A": "a"}}\n')
    with pytest.raises(DataError, match=r"medqa.jsonl:1"):
        B.load_medqa(f)


def test_medqa_original_shape_item(tmp_path):
    """The original shape (question, options {A..D}, answer_idx), field by field."""
    f = tmp_path / "orig.jsonl"
    f.write_text(json.dumps({"question": "Which nerve?", "answer": "radial", "answer_idx": "B",
                             "options": {"A": "ulnar", "B": "radial", "C": "median", "D": "axillary"},
                             "meta_info": "step1"}) + "\n")
    (it,) = B.load_medqa(f)
    assert (it.id, it.benchmark, it.subject, it.question) == ("medqa-1", "medqa", "step1", "Which nerve?")
    assert (it.options, it.answer, it.answer_letter) == (["ulnar", "radial", "median", "axillary"], 1, "B")


def test_medqa_hf_shape_reads_like_the_original(tmp_path):
    """The Hugging Face shape lm-evaluation-harness's medqa_4options reads (sent1, ending0..3, label) gives the
    same items, and so the same prompts, as the original shape of the same questions."""
    questions = [("Which nerve?", ["ulnar", "radial", "median", "axillary"], 1),
                 ("Which drug?", ["aspirin", "heparin", "warfarin", "insulin"], 3)]
    orig, hf = tmp_path / "orig.jsonl", tmp_path / "hf.jsonl"
    orig.write_text("".join(json.dumps({"id": f"q{i}", "question": q, "answer_idx": "ABCD"[a],
                                        "options": dict(zip("ABCD", o, strict=True))}) + "\n"
                            for i, (q, o, a) in enumerate(questions)))
    hf.write_text("".join(json.dumps({"id": f"q{i}", "sent1": q, "sent2": "", "label": a,
                                      **{f"ending{j}": e for j, e in enumerate(o)}}) + "\n"
                          for i, (q, o, a) in enumerate(questions)))
    a, b = B.load_medqa(orig), B.load_benchmark("medqa", None, medqa_file=hf)
    assert [it.to_dict() for it in b] == [it.to_dict() for it in a]
    assert [(it.question, it.options, it.answer_letter, it.subject) for it in b] == [
        ("Which nerve?", ["ulnar", "radial", "median", "axillary"], "B", "usmle"),
        ("Which drug?", ["aspirin", "heparin", "warfarin", "insulin"], "D", "usmle")]
    assert [B.build_prompt(it) for it in b] == [B.build_prompt(it) for it in a]
    assert "B. radial\nC. median\nD. axillary\nAnswer:" in B.build_prompt(b[0])


@pytest.mark.parametrize(("row", "field"), [
    ({"sent1": "Q?", "ending0": "a", "ending1": "b", "ending2": "c", "label": 0}, "ending3"),
    ({"sent1": "Q?", "ending0": "a", "ending1": "b", "ending2": "c", "ending3": "d"}, "label"),
    ({"sent1": "Q?", "ending0": "a", "ending1": "b", "ending2": "c", "ending3": "d", "label": 4}, "label=4"),
    ({"sent1": "Q?", "ending0": "a", "ending1": "b", "ending2": "c", "ending3": "d", "label": "B"}, "label='B'"),
])
def test_medqa_hf_shape_malformed_row(tmp_path, row, field):
    """A bad Hugging Face row is a DataError naming the file, the line and the field."""
    f = tmp_path / "hf.jsonl"
    good = {"sent1": "Q0?", "sent2": "", "ending0": "a", "ending1": "b", "ending2": "c", "ending3": "d", "label": 2}
    f.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=r"hf\.jsonl:2") as exc:
        B.load_medqa(f)
    assert field in str(exc.value)


def test_unknown_benchmark_and_bad_format(tmp_path, shared_data):
    with pytest.raises(EvalError, match="Unknown benchmark 'medmcq'") as exc:
        B.parse_bench_names("pubmedqa,medmcq")
    assert "medmcqa" in exc.value.one_line()
    bad = tmp_path / "data"
    (bad / "medmcqa").mkdir(parents=True)
    lines = (shared_data / "medmcqa" / "dev.json").read_text().splitlines()[:3]
    row = json.loads(lines[2])
    row["cop"] = 7
    (bad / "medmcqa" / "dev.json").write_text("\n".join([*lines[:2], json.dumps(row)]) + "\n")
    with pytest.raises(DataError, match=r"dev.json:3: cop=7"):
        B.load_medmcqa(bad)
    shutil.copytree(shared_data / "mmlu_medical", bad / "mmlu_medical")
    (bad / "mmlu_medical" / "test" / "anatomy_test.csv").write_text("question,A,B\n")
    with pytest.raises(DataError, match="anatomy_test.csv:1"):
        B.load_mmlu_medical(bad)
