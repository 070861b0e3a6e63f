"""The `care data`, `care train` and `care merge` commands as a user runs them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from care.cli import main

REPO = Path(__file__).resolve().parent.parent


def _write_recipe(tmp_path, base) -> Path:
    data = tmp_path / "seed.jsonl"
    rows = [{"instruction": f"Reset my PIN, case {i}", "output": f"Open the app, case {i}.",
             "domain": ["banking", "telecom"][i % 2]} for i in range(30)]
    rows.append({"instruction": "no answer", "output": ""})
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"name: cli\nmodel: {{base: {base}}}\ndata:\n  sources:\n    - {{path: {data.name}}}\n  val_fraction: 0.1\n"
        "lora: {r: 4, alpha: 8, dropout: 0.0}\n"
        "training: {max_steps: 50, batch: 2, logging_steps: 1, eval_steps: 100, save_steps: 100, "
        "max_length: 96}\nsmoke: {training.max_steps: 2}\n", encoding="utf-8")
    return recipe


def test_data_train_merge_commands(tmp_path, tiny_llama, capsys):
    recipe = _write_recipe(tmp_path, tiny_llama)
    assert main(["data", str(recipe), "--out", str(tmp_path / "data")]) == 0
    out = capsys.readouterr().out
    assert "banking 15, telecom 15" in out and "bad rows: 1" in out and "seed.jsonl:31" in out
    report = json.loads((tmp_path / "data" / "data_report.json").read_text())
    assert report["bad_rows"]["total"] == 1 and report["stages"][0]["train_tokens"]["p50"] > 0
    assert main(["data", str(recipe), "--strict", "--no-tokenizer"]) == 2  # bad row is fatal, one-line error
    assert "seed.jsonl:31" in capsys.readouterr().err
    run = tmp_path / "run"
    assert main(["train", str(recipe), "--smoke", "--no-quant", "--out", str(run)]) == 0
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["global_step"] == 2
    assert main(["merge", str(run / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "care_merge.json").is_file()


@pytest.mark.slow  # a real `care train` process (torch + trl import ~15 s); the in-process test covers the logic
def test_sigterm_saves_checkpoint_then_resume(tmp_path, tiny_llama):
    recipe = _write_recipe(tmp_path, tiny_llama)
    run = tmp_path / "run"
    env = os.environ | {"CARE_NO_PROGRESS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "care.cli", "train", str(recipe), "--no-quant", "--out", str(run)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and metrics.read_text().count("\n") >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "--resume" in err and "Traceback" not in err
    ckpts = sorted(run.glob("checkpoint-*"))
    assert ckpts and not (run / "adapter").exists()
    step = int(ckpts[-1].name.split("-")[1])
    assert 2 <= step < 50
    assert main(["train", str(recipe), "--no-quant", "--out", str(run), "--resume", "--max-steps", str(step + 1)]
                ) == 0
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines() if '"loss"' in x]
    assert steps == list(range(1, step + 2))
