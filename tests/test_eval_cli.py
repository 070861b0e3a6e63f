"""`care eval`: end-to-end runs on the embedded GGUF, one-line errors, compare, and generation metrics."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from care.cli import main


def test_eval_parser_does_not_import_torch():
    code = ("import sys\nfrom care.cli import build_parser\nbuild_parser('eval')\n"
            "print([m for m in ('torch', 'transformers', 'llama_cpp') if m in sys.modules])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("Error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_unknown_benchmark_is_one_line(capsys, tmp_path, shared_data):
    err = _one_line_error(capsys, ["eval", "run", "-m", "smollm2", "--bench", "medmcqa,mmlu", "--out", str(tmp_path)])
    assert "Unknown benchmark 'mmlu'" in err and "mmlu_medical" in err


def test_model_that_cannot_produce_logits_is_one_line(capsys, tmp_path, shared_data):
    from care.eval.metrics import encoder_path

    # A BERT encoder folder: transformers has no causal-LM head for it.
    err = _one_line_error(capsys, ["eval", "run", "-m", str(encoder_path()), "--bench", "pubmedqa", "--limit", "2",
                                   "--out", str(tmp_path / "o")])
    assert "cannot produce logits" in err
    txt = tmp_path / "weights.txt"
    txt.write_text("not a model")
    err = _one_line_error(capsys, ["eval", "run", "-m", str(txt), "--bench", "pubmedqa", "--out", str(tmp_path / "p")])
    assert "Cannot produce logits" in err and "weights.txt" in err
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    err = _one_line_error(capsys, ["eval", "run", "-m", str(adapter), "--bench", "pubmedqa", "--out", str(tmp_path / "q")])
    assert "LoRA adapter" in err and "care merge" in err


def test_wrong_data_format_is_one_line(capsys, tmp_path):
    data = tmp_path / "data"
    (data / "pubmedqa").mkdir(parents=True)
    (data / "pubmedqa" / "ori_pqal.json").write_text("[1, 2]")
    (data / "pubmedqa" / "test_ground_truth.json").write_text("{}")
    err = _one_line_error(capsys, ["eval", "run", "-m", "smollm2", "--bench", "pubmedqa", "--data-dir", str(data),
                                   "--out", str(tmp_path / "o")])
    assert "Wrong data format" in err and "ori_pqal.json" in err


@pytest.mark.slow  # ~30-40 s on 2 cores: the end-to-end run goes to the slow pass (CI runs it)
def test_run_report_and_compare_on_embedded_gguf(capsys, tmp_path, shared_data):
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    argv = ["eval", "run", "-m", "small=smollm2", "--limit", "3", "--seed", "4", "--threads", "1", "--n-ctx", "2048"]
    assert main([*argv, "--bench", "pubmedqa,mmlu_medical", "--out", str(out_a)]) == 0
    assert main([*argv, "--bench", "mmlu_medical", "--shots", "1", "--out", str(out_b)]) == 0
    res = json.loads((out_a / "results.json").read_text())
    assert res["settings"]["complete"] is True and res["models"][0]["label"] == "small"
    assert len(res["models"][0]["files"]["SmolLM2-135M-Instruct.Q4_1.gguf"]) == 64
    r = res["results"]["small"]["pubmedqa"]
    assert r["n"] == 3 and [i["id"] for i in r["items"]] == res["settings"]["item_ids"]["pubmedqa"]
    assert (out_a / "accuracy.png").read_bytes()[:4] == b"\x89PNG" and (out_a / "mmlu_subjects.png").is_file()
    assert "![accuracy](accuracy.png)" in (out_a / "report.md").read_text()
    capsys.readouterr()
    assert main(["eval", "compare", str(out_a / "results.json"), str(out_b / "results.json")]) == 0
    cap = capsys.readouterr()
    assert "mmlu_medical" in cap.out and "McNemar" in cap.out and "settings differ: shots 0 vs 1" in cap.err


@pytest.mark.slow
def test_generate_metrics_on_embedded_gguf(capsys, tmp_path, shared_data):
    user = tmp_path / "mine.jsonl"
    user.write_text(json.dumps({"query": "What is a fever?", "response": "A fever is a high body temperature."}) + "\n")
    argv = ["eval", "generate", "-m", "smollm2", "--set", f"pubmedqa,{user}", "--limit", "2", "--max-tokens", "24",
            "--threads", "1", "--n-ctx", "2048", "--out", str(tmp_path / "g")]
    assert main(argv) == 0
    res = json.loads((tmp_path / "g" / "results.json").read_text())
    pub = res["results"]["SmolLM2-135M-Instruct.Q4_1"]["pubmedqa"]
    assert pub["n"] == 2 and 0 <= pub["rouge"]["rougeL"] <= 1 and 0 < pub["bertscore"]["f1"] <= 1
    assert set(pub["decision"]) >= {"accuracy", "macro_f1", "weighted_f1"}
    assert all(i["prediction"] for i in pub["items"])
    assert "all-MiniLM-L6-v2" in res["settings"]["bertscore_encoder"]
    assert (tmp_path / "g" / "generation_pubmedqa.png").is_file()
    assert "BERTScore" in (tmp_path / "g" / "report.md").read_text()
