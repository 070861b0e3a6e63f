"""`care chat --once`, `care serve` and `care bench` from the command line (in-process, real model)."""

from __future__ import annotations

import json

from care.cli import main

FAST = ["--max-tokens", "12", "--temperature", "0", "--n-ctx", "512", "--threads", "1"]


def test_chat_once_flagged_prints_notice_and_card_then_the_model_only_when_asked(capsys):
    rc = main(["chat", "--once", "I took too many pills and feel dizzy", "--stats", *FAST])
    out, err = capsys.readouterr()
    assert rc == 0
    assert out.splitlines()[0].startswith("[SAFETY overdose_poisoning]") and "While help comes:" in out
    assert "tok/s" not in err  # no model ran
    rc = main(["chat", "--once", "I took too many pills and feel dizzy", "--stats", "--ask-anyway", *FAST])
    out, err = capsys.readouterr()
    assert rc == 0 and out.index("While help comes:") < out.index("not vetted") < out.index("not a diagnosis")
    assert "domain: medical" in err and "tok/s" in err


def test_chat_once_banking_domain_no_notice(capsys):
    rc = main(["chat", "--once", "my card payment bounced", "--domain", "banking", "--stats", *FAST])
    out, err = capsys.readouterr()
    assert rc == 0 and "[SAFETY" not in out and "not a diagnosis" not in out
    assert out.strip() and "domain: banking" in err


def test_chat_once_languages(capsys):
    rc = main(["chat", "--once", "je n'arrive pas à respirer", "--lang", "fr", *FAST])
    out, _ = capsys.readouterr()
    assert rc == 0 and out.startswith("[SAFETY difficulty_breathing] Une forte difficulté à respirer")


def test_chat_once_too_long_is_one_line_error(capsys):
    rc = main(["chat", "--once", "word " * 600, *FAST])
    _, err = capsys.readouterr()
    assert rc == 2 and err.startswith("Error: The message is too long") and err.count("\n") == 1


def test_serve_refuses_lan_without_key(capsys, monkeypatch):
    monkeypatch.delenv("CARE_API_KEY", raising=False)
    rc = main(["serve", "--host", "0.0.0.0"])
    _, err = capsys.readouterr()
    assert rc == 2 and "--api-key" in err


def test_bench_writes_table_and_json(tmp_path, capsys, embedded_gguf):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--profile", "phone", "--threads", "1", "--n-ctx", "512", "--prompt-tokens", "32",
               "--gen-tokens", "8", "--json", str(out)])
    stdout, _ = capsys.readouterr()
    assert rc == 0, stdout
    data = json.loads(out.read_text())
    (row,) = data["results"]
    from care.runtime.profiles import PROFILES

    phone = PROFILES["phone"]
    assert data["config"]["kv_type"] == "q8_0/q4_0" and data["config"]["repack"] is phone["repack"]
    assert data["config"]["use_mmap"] is phone["use_mmap"] and data["config"]["ceiling_gb"] == 4.0
    assert row["n_ctx"] == 512 and (row["type_k"], row["type_v"]) == ("q8_0", "q4_0")
    assert row["within_ceiling"] is True and row["over_ceiling"] is False
    assert 0 < row["peak_rss_gb"] < 4 and row["decode_tok_s"] > 0 and row["prefill_tok_s"] > 0
    assert row["load_s"] > 0 and abs(row["file_gb"] - embedded_gguf.stat().st_size / 1e9) < 0.002
    assert "decode tok/s" in stdout and "q8_0/q4_0" in stdout
    # A new chat: the domain prompt's state saved (cold), then loaded (cached): only the question is prefilled.
    assert row["chat_prefix_tokens"] > 20 and row["chat_prefill_cached"] == row["chat_question_tokens"]
    assert row["chat_prefill_nocache"] == row["chat_prefix_tokens"] + row["chat_question_tokens"]
    assert row["followup_cache"] == "live" and 0 < row["followup_prefill"] < row["followup_prompt_tokens"] / 2
    # Decode against the memory-bandwidth bound, from the same run.
    assert row["bandwidth_gb_s"] > 0.1 and 0 < row["decode_fraction"] == row["decode_tok_s"] / row["bound_tok_s"]
    assert "memory-bandwidth bound" in stdout


def test_bench_ceiling_stops_the_run_that_passes_it(tmp_path, capsys):
    """The ceiling is enforced like a phone's low-memory killer: the child is stopped, the command exits 1."""
    out = tmp_path / "bench.json"
    rc = main(["bench", "--profile", "phone", "--threads", "1", "--n-ctx", "512", "--prompt-tokens", "32",
               "--gen-tokens", "8", "--ceiling-gb", "0.08", "--no-chat-ttft", "--json", str(out)])
    stdout, err = capsys.readouterr()
    assert rc == 1
    (row,) = json.loads(out.read_text())["results"]
    assert row["over_ceiling"] is True and "passed the 0.08 GB ceiling" in row["error"]
    assert row["peak_rss_gb"] > 0.08 and "decode_tok_s" not in row  # stopped before it could finish
    assert "Over the 0.08 GB memory ceiling" in err and "> 0.08" in stdout


def test_bench_kv_type_pair_and_no_mmap(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--threads", "1", "--n-ctx", "512", "--prompt-tokens", "32", "--gen-tokens", "8",
               "--kv-type", "q8_0/q4_0", "--mmap", "off", "--repack", "on", "--no-chat-ttft", "--json", str(out)])
    capsys.readouterr()
    assert rc == 0
    data = json.loads(out.read_text())
    (row,) = data["results"]
    assert (row["type_k"], row["type_v"], row["use_mmap"], row["repack"]) == ("q8_0", "q4_0", False, True)
    assert data["config"]["flash_attn"] is True  # a quantized V cache needs it
    assert main(["bench", "--kv-type", "q3_k", "--json", str(out)]) == 2
    assert "Unknown KV-cache type 'q3_k'" in capsys.readouterr().err


def test_chat_once_phone_profile_and_summarize_flag(capsys):
    rc = main(["chat", "--once", "How do I top up my phone plan?", "--profile", "phone", "--context", "summarize",
               "--stats", "--max-tokens", "12", "--temperature", "0", "--n-ctx", "512", "--threads", "1"])
    out, err = capsys.readouterr()
    assert rc == 0 and out.strip() and "tok/s" in err


def test_engine_config_from_profile_and_overrides():
    import argparse

    from care.commands.chat import add_arguments, engine_config_from_args
    from care.runtime.profiles import PROFILES

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    phone = engine_config_from_args(parser.parse_args(["--profile", "phone", "--context", "summarize"]))
    p = PROFILES["phone"]
    assert (phone.type_k, phone.type_v, phone.repack, phone.use_mmap, phone.n_threads, phone.n_ctx) == (
        p["type_k"], p["type_v"], p["repack"], p["use_mmap"], p["threads"], p["n_ctx"])
    assert phone.flash_attn is True and phone.context_policy == "summarize"
    laptop = engine_config_from_args(parser.parse_args(["--kv-type", "q4_0", "--threads", "3", "--n-ctx", "1024"]))
    assert (laptop.type_k, laptop.type_v, laptop.flash_attn, laptop.n_threads, laptop.n_ctx) == (
        "q4_0", "q4_0", True, 3, 1024)
    assert laptop.repack is None and laptop.context_policy == "drop"


def test_sampling_defaults_have_one_home():
    """The command line's sampling defaults are SamplingConfig's, and the typed options load without argparse."""
    import argparse

    from care.commands.chat import add_arguments, engine_options, sampling_from_args
    from care.runtime.backend import SamplingConfig
    from care.runtime.loader import EngineOptions, engine_config

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([])
    assert sampling_from_args(args) == SamplingConfig() == sampling_from_args(argparse.Namespace())
    assert engine_options(args) == EngineOptions(sampling=SamplingConfig())
    cfg = engine_config(EngineOptions(profile="phone", n_ctx=1024, sampling=SamplingConfig(max_tokens=7)))
    assert cfg.n_ctx == 1024 and cfg.type_k == "q8_0" and cfg.sampling.max_tokens == 7
    assert SamplingConfig.greedy(5) == SamplingConfig(temperature=0.0, top_k=1, repeat_penalty=1.0, seed=0,
                                                      max_tokens=5)
