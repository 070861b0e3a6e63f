"""Data loading, bad-row reporting, balancing, splitting and two-stage mixing."""

from __future__ import annotations

import csv
import json
from collections import Counter

import pytest

from care.errors import DataError
from care.train.data import (
    balance,
    build_data,
    cap_and_weight,
    dedupe,
    domain_counts,
    mix_stages,
    split_stratified,
)
from care.train.readers import BadRows, Record, read_source


def _recs(counts: dict[str, int]) -> list[Record]:
    return [Record(id=f"{d}{i}", query=f"{d} q{i}", response=f"a{i}", domain=d)
            for d, n in counts.items() for i in range(n)]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_generic_formats_and_column_mapping(tmp_path):
    bad = BadRows()
    a = read_source(_jsonl(tmp_path / "a.jsonl", [{"query": "q", "response": "r", "domain": "Banking"}]), None, bad)
    b = read_source(_jsonl(tmp_path / "b.jsonl", [{"instruction": "Do X", "input": "ctx", "output": "done"}]),
                    None, bad, domain="telecom")
    c = read_source(_jsonl(tmp_path / "c.jsonl", [{"text": "prompt", "completion": "comp"}]), None, bad)
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "u1"},
            {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"},
            {"role": "assistant", "content": "a2"}]
    d = read_source(_jsonl(tmp_path / "d.jsonl", [{"messages": msgs, "domain": "medical"}]), None, bad)
    (tmp_path / "e.json").write_text(json.dumps([{"q": "x?", "a": "y."}]), encoding="utf-8")
    e = read_source(tmp_path / "e.json", None, bad, columns={"query": "q", "response": "a"})
    assert bad.rows == []
    assert (a[0].query, a[0].response, a[0].domain) == ("q", "r", "banking")
    assert b[0].query == "Do X\n\nctx" and b[0].response == "done" and b[0].domain == "telecom"
    assert (c[0].query, c[0].response) == ("prompt", "comp")
    assert d[0].messages == msgs and d[0].system == "S" and d[0].response == "a2" and d[0].query == "u2"
    assert (e[0].query, e[0].response) == ("x?", "y.")


def test_parquet_and_datasets_folder(tmp_path):
    from datasets import Dataset

    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(3)]
    ds = Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "p.parquet"))
    ds.save_to_disk(str(tmp_path / "hf"))
    bad = BadRows()
    p = read_source(tmp_path / "p.parquet", None, bad)
    h = read_source(tmp_path / "hf", None, bad)
    assert [r.query for r in p] == ["q0", "q1", "q2"] == [r.query for r in h]
    assert [r.response for r in h] == ["a0", "a1", "a2"]


def test_bad_rows_reported_by_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps({"query": "ok", "response": "fine"}).encode(),
             json.dumps({"query": "q", "response": ""}).encode(),
             b"{not json",
             '{"query": "caf\u00e9", "response": "x"}'.encode("latin-1"),
             json.dumps({"query": "q2"}).encode()]
    path.write_bytes(b"\n".join(lines) + b"\n")
    bad = BadRows()
    recs = read_source(path, None, bad)
    assert [r.query for r in recs] == ["ok"]
    got = {(b.line, b.reason) for b in bad.rows}
    assert got == {(2, "empty or missing response"), (3, "not valid JSON"), (4, "non-UTF-8 bytes"),
                   (5, "empty or missing response")}
    assert bad.summary()["by_file"][str(path)]["count"] == 4
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        read_source(path, None, BadRows(strict=True))


def test_missing_mapped_column_and_csv_lines(tmp_path):
    path = tmp_path / "x.csv"
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        w.writerow(["multi\nline question", "ans"])
        w.writerow(["second", ""])
    bad = BadRows()
    recs = read_source(path, None, bad, columns={"query": "text", "response": "label"})
    assert len(recs) == 1 and recs[0].origin.endswith(":2")
    assert [(b.line, b.reason) for b in bad.rows] == [(4, "empty or missing response")]  # row starts on line 4
    bad2 = BadRows()
    assert read_source(path, None, bad2, columns={"query": "text", "response": "nope"}) == []
    assert bad2.rows[0].reason == "missing column 'nope'"


def test_balance_downsamples_to_smallest_seeded():
    recs = _recs({"banking": 50, "medical": 7, "telecom": 20})
    out = balance(recs, seed=1)
    assert domain_counts(out) == {"banking": 7, "medical": 7, "telecom": 7}
    assert [r.id for r in out] == [r.id for r in balance(recs, seed=1)]
    assert [r.id for r in out] != [r.id for r in balance(recs, seed=2)]


def test_caps_weights_dedupe_split():
    recs = _recs({"banking": 40, "medical": 10})
    assert domain_counts(cap_and_weight(recs, caps={"banking": 15})) == {"banking": 15, "medical": 10}
    assert domain_counts(cap_and_weight(recs, weights={"banking": 2.0})) == {"banking": 20, "medical": 10}
    dup = recs[:3] + [Record(id="dup", query="  BANKING q0 ", response="a0", domain="banking")]
    assert [r.id for r in dedupe(dup)] == ["banking0", "banking1", "banking2"]
    train, val = split_stratified(recs, 0.1, seed=0)
    assert domain_counts(val) == {"banking": 4, "medical": 1}
    assert not {r.id for r in train} & {r.id for r in val} and len(train) + len(val) == 50


def test_two_stage_mix_fraction(tmp_path):
    s1 = _recs({"general": 100})
    s2 = _recs({"medical": 30})
    mixed = mix_stages(s1, s2, 0.2, seed=0)
    assert Counter(r.domain for r in mixed) == {"medical": 30, "general": 20}
    with pytest.raises(DataError):
        mix_stages(s1, s2, 1.5)
    p1 = _jsonl(tmp_path / "s1.jsonl", [{"query": f"g{i}", "response": "r", "domain": "general"} for i in range(40)])
    p2 = _jsonl(tmp_path / "s2.jsonl", [{"query": f"m{i}", "response": "r", "domain": "medical"} for i in range(20)])
    bundle = build_data({"sources": [{"path": str(p1)}, {"path": str(p2), "stage": 2}], "balance": "none",
                         "val_fraction": 0.0, "stages": {"mix_k": 0.5}, "seed": 3})
    assert len(bundle.stages) == 2
    assert domain_counts(bundle.stages[0].train) == {"general": 40}
    assert domain_counts(bundle.stages[1].train) == {"general": 20, "medical": 20}


# -- the official files in ../shared/data -------------------------------------------------------------------

def test_pubmedqa_reader(shared_data):
    bad = BadRows()
    recs = read_source(shared_data / "pubmedqa" / "ori_pqal.json", "pubmedqa", bad, options={"split": "train"})
    assert len(recs) == 500 and not bad.rows
    r = recs[0]
    assert r.domain == "medical" and r.query.startswith("Context:\n") and "\nQuestion: " in r.query
    assert r.response.rsplit("\n", 1)[-1] in ("Answer: yes", "Answer: no", "Answer: maybe")
    test = read_source(shared_data / "pubmedqa" / "ori_pqal.json", "pubmedqa", bad, options={"split": "test"})
    assert len(test) == 500 and not {x.id for x in test} & {x.id for x in recs}


def test_medquad_bitext_banking_medmcqa_readers(shared_data):
    bad = BadRows()
    mq = read_source(shared_data / "medquad" / "medquad.normalized.jsonl.gz", "medquad", bad, limit=20)
    assert len(mq) == 20 and all(r.domain == "medical" and r.response for r in mq)
    bitext = next((shared_data / "bitext_customer_support").glob("*.csv"))
    keep = read_source(bitext, "bitext", bad, limit=200)
    strip = read_source(bitext, "bitext", bad, limit=200, options={"placeholders": "strip"})
    drop = read_source(bitext, "bitext", bad, limit=200, options={"placeholders": "drop"})
    assert any("{{" in r.response for r in keep) and not any("{{" in r.response for r in strip)
    assert not any("{{" in r.response for r in drop) and len(drop) == 200
    unbrace = lambda t: t.replace("{{", "").replace("}}", "")  # noqa: E731 - strip = the same rows, braces removed
    assert len(keep) == len(strip) and all(unbrace(k.query) == s.query and unbrace(k.response) == s.response
                                           for k, s in zip(keep, strip, strict=True))
    b77 = read_source(shared_data / "banking77" / "train.csv", "banking77", bad, limit=5)
    assert b77[0].domain == "banking" and b77[0].response == "Intent: card arrival"
    mc = read_source(shared_data / "medmcqa" / "dev.json", "medmcqa", bad, limit=5)
    assert mc[0].query.count("\n") >= 4 and mc[0].response[0] in "ABCD"
    assert not bad.rows
