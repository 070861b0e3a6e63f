"""`care chat --once`, `care serve` and `care bench` from the command line (in-process, real model)."""

from __future__ import annotations

import json

from care.cli import main

FAST = ["--max-tokens", "12", "--temperature", "0", "--n-ctx", "512", "--threads", "1"]


def test_chat_once_prints_safety_notice_before_answer(capsys):
    rc = main(["chat", "--once", "I took too many pills and feel dizzy", "--stats", *FAST])
    out, err = capsys.readouterr()
    assert rc == 0
    first_line = out.splitlines()[0]
    assert first_line.startswith("[SAFETY overdose_poisoning]")
    assert "not a diagnosis" in out
    assert "domain: medical" in err and "tok/s" in err


def test_chat_once_banking_domain_no_notice(capsys):
    rc = main(["chat", "--once", "my card payment bounced", "--domain", "banking", "--stats", *FAST])
    out, err = capsys.readouterr()
    assert rc == 0 and "[SAFETY" not in out and "not a diagnosis" not in out
    assert out.strip() and "domain: banking" in err


def test_chat_once_languages(capsys):
    rc = main(["chat", "--once", "je n'arrive pas à respirer", "--lang", "fr", *FAST])
    out, _ = capsys.readouterr()
    assert rc == 0 and out.startswith("[SAFETY difficulty_breathing] Il peut s'agir d'une urgence")


def test_chat_once_too_long_is_one_line_error(capsys):
    rc = main(["chat", "--once", "word " * 600, *FAST])
    _, err = capsys.readouterr()
    assert rc == 2 and err.startswith("Error: The message is too long") and err.count("\n") == 1


def test_serve_refuses_lan_without_key(capsys, monkeypatch):
    monkeypatch.delenv("CARE_API_KEY", raising=False)
    rc = main(["serve", "--host", "0.0.0.0"])
    _, err = capsys.readouterr()
    assert rc == 2 and "--api-key" in err


def test_bench_writes_table_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--profile", "phone", "--threads", "1", "--n-ctx", "512", "--prompt-tokens", "32",
               "--gen-tokens", "8", "--json", str(out)])
    stdout, _ = capsys.readouterr()
    assert rc == 0, stdout
    data = json.loads(out.read_text())
    (row,) = data["results"]
    assert data["config"]["kv_type"] == "q8_0" and data["config"]["repack"] is False
    assert row["n_ctx"] == 512 and row["type_k"] == "q8_0" and row["within_ceiling"] is True
    assert 0 < row["peak_rss_gb"] < 4 and row["decode_tok_s"] > 0 and row["prefill_tok_s"] > 0
    assert row["load_s"] > 0 and abs(row["file_gb"] - 0.098) < 0.01
    assert "decode tok/s" in stdout and "q8_0" in stdout
