"""bench/gpu_check's pieces that run without a GPU: the stage-failure JSON, the sized training rows, and the
Phi-3 GGUF name rule the script's export depends on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from care.export.converter import gguf_name
from care.export.hf_source import ModelSource

REPO = Path(__file__).resolve().parent.parent


def _source(tmp_path: Path, name: str, tokens: list[str]) -> ModelSource:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "tokenizer.json").write_text(json.dumps(
        {"model": {"vocab": {t: i for i, t in enumerate(tokens)}}, "added_tokens": []}))
    return ModelSource(path=folder, config={}, architecture="Phi3ForCausalLM", llama_arch="phi3")


def test_merged_phi3_folder_keeps_phi3_token_rules(tmp_path):
    """llama.cpp applies Phi-3's special-token rules by general.name: a merged Phi-3 folder named `merged`
    gets a phi3 prefix (measured on the tiny Phi-3: without it the chat prompt tokenized unlike HF and
    verification failed); an explicit --name and a vocabulary without Phi-3's tokens are left alone."""
    phi3_tokens = ["</s>", "<unk>", "<s>", "<|endoftext|>", "<|end|>"]
    assert gguf_name(_source(tmp_path, "merged", phi3_tokens), None) == "phi3-merged"
    assert gguf_name(_source(tmp_path, "Phi-3.5-mini-instruct", phi3_tokens), None) == "Phi-3.5-mini-instruct"
    assert gguf_name(_source(tmp_path, "m2", phi3_tokens), "care-v1") == "care-v1"
    assert gguf_name(_source(tmp_path, "m3", ["<s>", "</s>"]), None) == "m3"


def test_collect_names_the_failed_stage_and_checks_targets(tmp_path):
    (tmp_path / "train.json").write_text(json.dumps({"peak_gpu_reserved_gb": 15.2, "tokens_per_s": 100.0}))
    (tmp_path / "compare.json").write_text(json.dumps({"ratio": 1.41, "device": "cuda"}))
    (tmp_path / "times.tsv").write_text("doctor\t3\ntrain\t120\n")
    out = tmp_path / "out.json"
    subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "collect", "--work", str(tmp_path),
                    "--out", str(out), "--failed", "merge"], check=True, capture_output=True,
                   env=os.environ | {"PYTHONPATH": str(REPO)})
    data = json.loads(out.read_text())
    assert data["failed_stage"] == "merge" and data["stage_seconds"] == {"doctor": 3.0, "train": 120.0}
    assert data["targets"]["peak_gpu_gb"] == {"value": 15.2, "max": 14.0, "met": False}
    assert data["targets"]["throughput_vs_baseline"]["met"] is True


def test_script_fails_naming_the_stage(tmp_path):
    """A stage that fails stops the script with a non-zero exit naming it, and the JSON says which."""
    out = tmp_path / "o.json"
    env = os.environ | {"PYTHON": str(tmp_path / "no-such-python")}
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--smoke", "--work", str(tmp_path / "w"),
                           "--out", str(out)], capture_output=True, text=True, env=env)
    assert proc.returncode != 0
    assert "FAILED at stage 'doctor'" in proc.stderr


def test_training_rows_fill_max_length(tiny_llama):
    sys.path.insert(0, str(REPO / "bench"))
    from gpu_check import _sized_rows

    from care.train.formatting import token_lengths
    from care.train.modeling import load_tokenizer
    from care.train.readers import Record

    tok = load_tokenizer(str(tiny_llama))
    rows = _sized_rows(tok, 3, 256)
    lengths = token_lengths(tok, [Record(id=str(i), **r) for i, r in enumerate(rows)])
    assert len(rows) == 3 and all(200 <= n <= 256 for n in lengths)


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_stage_on_cpu(tmp_path):
    """The whole script on the tiny Phi-3 (about 2 min on an idle 2-core machine)."""
    out = tmp_path / "gpu_check.json"
    env = os.environ | {"PYTHON": sys.executable, "CARE_THREADS": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--smoke", "--work", str(tmp_path / "w"),
                           "--out", str(out)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["failed_stage"] is None
    assert set(data["stages"]) == {"doctor", "model", "train", "compare", "merge", "export"}
    assert data["stages"]["train"]["steps"] == 3 and data["stages"]["train"]["tokens_per_s"] > 0
    assert data["stages"]["compare"]["ratio"] > 0
    export = data["stages"]["export"]
    assert export["verified"] is True and export["verify"]["files"]["q4_k_m"]["passed"] is True
