"""Generation metrics on hand-computed examples, and the report/compare helpers."""

from __future__ import annotations

import pytest

from care.eval import metrics, report


def test_rouge_tiny_strings_by_hand():
    # pred unigrams 3 all in ref (6): P=1, R=1/2 -> F=2/3; bigrams: 2 of pred's 2 in ref's 5 -> F=2*0.4/1.4.
    r = metrics.rouge(["the cat sat"], ["the cat sat on the mat"])
    assert r["rouge1"] == pytest.approx(2 / 3)
    assert r["rouge2"] == pytest.approx(0.8 / 1.4)
    assert r["rougeL"] == pytest.approx(2 / 3)
    # Stemming: "cats"/"cat" match; order matters for L but not for 1.
    r2 = metrics.rouge(["mat the on"], ["the cats on the mat"])
    assert r2["rouge1"] == pytest.approx(2 * 1 * 0.6 / 1.6)
    assert r2["rougeL"] < r2["rouge1"]
    # Lsum uses sentence splits: two reordered sentences keep a perfect summary-level LCS, plain L does not.
    r3 = metrics.rouge(["B b b. A a a."], ["A a a. B b b."])
    assert r3["rougeLsum"] == pytest.approx(1.0) and r3["rougeL"] < 1.0
    assert metrics.rouge(["x", "the cat sat"], ["y", "the cat sat on the mat"])["rouge1"] == pytest.approx(1 / 3)


@pytest.fixture(scope="module")
def bertscorer():
    return metrics.BERTScorer()


def test_bertscore_identical_is_one_and_symmetric(bertscorer):
    a = "Take paracetamol and drink plenty of fluids."
    b = "See a doctor if the fever lasts more than three days."
    same, ab, ba = bertscorer.score([a, a, b], [a, b, a])
    assert same["f1"] == pytest.approx(1.0, abs=1e-5)
    assert same["precision"] == pytest.approx(1.0, abs=1e-5)
    # Greedy matching: P(a|b) is R(b|a) by definition, and unrelated text scores below identical text.
    assert ab["precision"] == pytest.approx(ba["recall"], abs=1e-5)
    assert ab["f1"] == pytest.approx(ba["f1"], abs=1e-5) and ab["f1"] < 0.95
    near = bertscorer.score(["Take paracetamol and drink lots of fluids."], [a])[0]
    assert ab["f1"] < near["f1"] < 1.0
    assert "all-MiniLM-L6-v2" in metrics.BERTSCORE_ENCODER and "roberta-large" in metrics.BERTSCORE_NOTE


def test_decision_extraction_and_f1_by_hand():
    assert metrics.extract_decision("Yes, it does.") == "yes"
    assert metrics.extract_decision("The answer is maybe; no data") == "maybe"
    assert metrics.extract_decision("Unclear.") is None
    assert metrics.extract_decision("Nobody knows") is None  # word boundary: "Nobody" is not "no"
    gold = ["yes", "yes", "no", "maybe"]
    pred = ["yes", "no", "no", None]
    s = metrics.classification_scores(gold, pred)
    # yes: P=1 R=1/2 F=2/3; no: P=1/2 R=1 F=2/3; maybe: F=0. macro = 4/9, weighted = (2*2/3 + 2/3 + 0)/4 = 1/2.
    assert s["accuracy"] == 0.5
    assert s["macro_f1"] == pytest.approx(4 / 9)
    assert s["weighted_f1"] == pytest.approx(0.5)
    assert s["no_decision"] == 1


def test_length_stats():
    assert metrics.length_stats(["a b c", "d"]) == {"mean_words": 2.0, "mean_chars": 3.0}


def _fake_mc(labels_quants: list[tuple[str, str]], accs: dict[str, list[bool]]) -> dict:
    res = report.new_results("mc", {"shots": 0, "seed": 0, "limit": None, "prompt_version": 1})
    from care.eval.scoring import accuracy_summary

    for label, quant in labels_quants:
        res["models"].append({"label": label, "kind": "gguf", "quant": quant, "path": f"/m/{label}.gguf",
                              "files": {f"{label}.gguf": "0" * 64}})
        items = [{"id": str(i), "subject": "s", "correct": c, "answer": "A", "pred": "A"}
                 for i, c in enumerate(accs[label])]
        res["results"][label] = {"medmcqa": {**accuracy_summary(items), "items": items},
                                 "pubmedqa": {**accuracy_summary(items[:3]), "items": items[:3]}}
    return res


def test_report_writes_charts_and_quant_delta(tmp_path):
    res = _fake_mc([("q4", "Q4_K_M"), ("f16", "F16"), ("q8", "Q8_0")],
                   {"f16": [True] * 6 + [False] * 4, "q8": [True] * 5 + [False] * 5, "q4": [True] * 3 + [False] * 7})
    paths = report.write_report(res, tmp_path)
    for key in ("accuracy", "quant_delta", "results", "report"):
        assert paths[key].is_file()
    assert paths["accuracy"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = paths["report"].read_text()
    assert "| medmcqa | 10 | 30.0 [" in md and "![quant_delta](quant_delta.png)" in md
    assert report.load_results(paths["results"])["models"][0]["label"] == "q4"
    single = _fake_mc([("f16", "F16")], {"f16": [True, False]})
    assert "quant_delta" not in report.write_report(single, tmp_path / "one")


def test_compare_pairs_items_and_mcnemar_by_hand():
    a = _fake_mc([("m", "F16")], {"m": [False] * 5 + [True] * 5})
    b = _fake_mc([("m", "F16")], {"m": [True] * 10})
    rows = {r["benchmark"]: r for r in report.compare(a, b)["rows"]}
    r = rows["medmcqa"]
    assert (r["n"], r["a"], r["b"], r["delta"]) == (10, 0.5, 1.0, 0.5)
    assert (r["a_only_correct"], r["b_only_correct"]) == (0, 5)
    assert r["mcnemar_p"] == pytest.approx(2 / 32)  # exact binomial: 2 * 0.5^5
    b["settings"]["shots"] = 5
    assert any("shots" in w for w in report.compare(a, b)["warnings"])


def test_load_results_rejects_other_json(tmp_path):
    from care.errors import DataError

    f = tmp_path / "x.json"
    f.write_text('{"a": 1}')
    with pytest.raises(DataError, match="Not a care eval results file"):
        report.load_results(f)
