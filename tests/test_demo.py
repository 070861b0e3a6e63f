"""`care demo` and the pipeline behind it (care/pipeline/)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _sample_queries() -> set[str]:
    from care.pipeline import SAMPLES_DIR

    queries = set()
    for f in SAMPLES_DIR.glob("*.jsonl"):
        queries |= {json.loads(line)["query"].casefold() for line in f.read_text(encoding="utf-8").splitlines()
                    if line.strip()}
    for f in SAMPLES_DIR.glob("*.json"):
        queries |= {r["text"].casefold() for r in json.loads(f.read_text(encoding="utf-8"))}
    return queries


def test_before_after_questions_are_held_out():
    from care.pipeline import QUESTIONS

    queries = _sample_queries()
    assert len(queries) > 100
    for q in QUESTIONS.values():
        assert q.casefold() not in queries


def test_demo_recipe_is_care_on_the_shipped_samples():
    from care.pipeline import DEFAULT_STEPS, demo_recipe
    from care.train.data import build_data

    recipe = demo_recipe()
    assert recipe.model["base"] == "embedded"
    assert (recipe.lora["r"], recipe.lora["alpha"], recipe.lora["dropout"]) == (8, 32, 0.05)
    assert recipe.quant["load_in_4bit"] and recipe.quant["quant_type"] == "nf4"
    assert recipe.training["max_steps"] == DEFAULT_STEPS
    assert recipe.export["quants"] == ["q4_k_m"]
    bundle = build_data(recipe.data, resolve=recipe.resolve_path)
    balanced = bundle.report["stages"][0]["after_balance"]
    assert set(balanced) == {"banking", "telecom", "medical"} and len(set(balanced.values())) == 1
    assert demo_recipe(7, overrides=["training.lr=1e-4"]).training["lr"] == pytest.approx(1e-4)


def test_customer_service_test_file_converts_for_care_eval(tmp_path):
    from care.eval.generation import load_gen_set
    from care.pipeline import SAMPLES_DIR

    src = SAMPLES_DIR / "customer_service_test.json"
    rows = json.loads(src.read_text(encoding="utf-8"))
    pairs = load_gen_set(str(src), None)
    assert [p["query"] for p in pairs] == [r["text"] for r in rows]
    assert [p["response"] for p in pairs] == [r["completion"] for r in rows]


def test_bad_test_file_is_a_one_line_error(tmp_path):
    from care.errors import DataError
    from care.eval.generation import load_gen_set

    bad = tmp_path / "test.json"
    bad.write_text(json.dumps([{"text": "hello", "completion": ""}]), encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_gen_set(str(bad), None)
    assert "test.json" in err.value.one_line() and len(err.value.one_line().splitlines()) == 1


def _tiny_recipe(base: Path, source: str, steps: int = 2):
    from care.train.config import recipe_from_dict

    return recipe_from_dict({
        "name": "tiny-pipeline",
        "model": {"base": str(base)},
        "data": {"sources": [{"path": source}], "balance": "downsample", "val_fraction": 0.0},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "quant": {"load_in_4bit": False},
        "training": {"max_steps": steps, "batch": 2, "max_length": 256, "logging_steps": 1, "save_steps": 50,
                     "lr": 1e-3, "warmup": 0},
        "merge": {"method": "reload"},
        "export": {"quants": ["q8_0"], "verify": False},
    })


def test_failed_stage_is_reported_and_nothing_is_removed(tmp_path, tiny_llama):
    from care.errors import DataError
    from care.pipeline import run_pipeline

    recipe = _tiny_recipe(tiny_llama, str(tmp_path / "missing.jsonl"))
    out = tmp_path / "run"
    with pytest.raises(DataError):
        run_pipeline(recipe, out)
    report = json.loads((out / "demo_report.json").read_text(encoding="utf-8"))
    assert report["status"] == "failed"
    assert report["stages"][0]["name"] == "train" and report["stages"][0]["status"] == "failed"
    assert "missing.jsonl" in report["error"]
    assert [s["status"] for s in report["stages"][1:]] == ["pending"] * 4
    assert (out / "recipe.yaml").is_file() and "missing.jsonl" in (out / "recipe.yaml").read_text()
    assert "failed" in (out / "demo_report.md").read_text(encoding="utf-8")


def test_ctrl_c_keeps_a_report_that_says_where_it_stopped(tmp_path, tiny_llama):
    from care.pipeline import Reporter, run_pipeline

    class StopAtMerge(Reporter):
        def stage_start(self, index, total, name, description):
            if name == "merge":
                raise KeyboardInterrupt

    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(_tiny_recipe(tiny_llama, str(REPO / "care/data/samples/banking.jsonl")), out,
                     reporter=StopAtMerge())
    report = json.loads((out / "demo_report.json").read_text(encoding="utf-8"))
    assert report["status"] == "interrupted"
    assert {s["name"]: s["status"] for s in report["stages"]}["train"] == "done"
    assert (out / "train" / "adapter" / "adapter_config.json").is_file(), "the trained adapter is kept"


def test_a_different_recipe_never_reuses_an_old_run(tmp_path, tiny_llama):
    from care.errors import ConfigError
    from care.pipeline import run_pipeline

    out = tmp_path / "run"
    out.mkdir()
    (out / "recipe.yaml").write_text("name: something-else\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="different recipe"):
        run_pipeline(_tiny_recipe(tiny_llama, str(tmp_path / "x.jsonl")), out)
    assert (out / "recipe.yaml").read_text(encoding="utf-8") == "name: something-else\n"


@pytest.mark.slow  # ~30-40 s on 2 cores: the end-to-end run goes to the slow pass (CI runs it)
def test_tiny_pipeline_end_to_end(tmp_path, tiny_llama):
    """The glue on a tiny random Llama: train, merge, export (the base gets exported too, since it is not
    the embedded GGUF), before/after through the runtime engine, report."""
    from care.pipeline import PipelineOptions, run_pipeline

    recipe = _tiny_recipe(tiny_llama, str(REPO / "care/data/samples/telecom.jsonl"))
    out = tmp_path / "run"
    rep = run_pipeline(recipe, out, options=PipelineOptions(max_tokens=8, threads=1,
                                                            questions={"telecom": "Is roaming on?"}))
    assert rep.status == "done"
    assert [s.status for s in rep.stages] == ["done", "done", "done", "done", "skipped"]
    tuned, base = Path(rep.tuned_gguf), Path(rep.base_gguf)
    assert tuned.is_file() and base.is_file() and tuned != base
    assert base.parent == (out / "base-gguf").resolve() or base.parent == out / "base-gguf"
    assert rep.before_after[0]["question"] == "Is roaming on?"
    assert rep.before_after[0]["after_tokens"] > 0
    assert rep.chat_command.startswith("care chat --model ") and str(tuned.resolve()) in rep.chat_command
    saved = json.loads((out / "demo_report.json").read_text(encoding="utf-8"))
    assert saved["tuned_gguf"] == rep.tuned_gguf
    assert saved["stages"][0]["details"]["metrics"]["global_step"] == 2
    md = (out / "demo_report.md").read_text(encoding="utf-8")
    assert "Is roaming on?" in md and "care chat --model" in md


def test_cli_usage_errors():
    from care.cli import main

    assert main(["demo", "--smoke"]) == 2
    assert main(["demo", "--recipe", "no/such/recipe.yaml"]) == 2
    assert main(["demo", "--recipe", str(REPO / "recipes/care.yaml"), "--steps", "3"]) == 2


def test_demo_command_does_not_import_torch_to_parse():
    code = ("import sys; from care.cli import build_parser; build_parser('demo').parse_args([]); "
            "print('torch' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert res.stdout.strip() == "False"


@pytest.mark.slow
def test_care_demo_command(tmp_path):
    """`care demo` itself, shortened to 2 steps: every stage, the before/after and the chat command."""
    out = tmp_path / "demo"
    res = subprocess.run([sys.executable, "-m", "care.cli", "demo", "--steps", "2", "--out", str(out),
                          "--max-tokens", "24", "--threads", "1"],
                         capture_output=True, text=True, cwd=REPO, timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((out / "demo_report.json").read_text(encoding="utf-8"))
    assert report["status"] == "done"
    assert [s["status"] for s in report["stages"]] == ["done", "done", "done", "done", "skipped"]
    assert {qa["domain"] for qa in report["before_after"]} == {"banking", "telecom", "medical"}
    assert all(qa["before"] and qa["after"] for qa in report["before_after"])
    # stdout ends with the chat command (transformers' Trainer also prints its log dicts there)
    assert res.stdout.strip().splitlines()[-1].startswith("care chat --model ")
    # Off a terminal: periodic one-line progress, no carriage-return frames, no warnings the user can't act on.
    assert "\r" not in res.stderr and "\r" not in res.stdout
    assert "train: step 2/2, loss" in res.stderr
    assert "kernels" not in res.stderr and "FutureWarning" not in res.stderr
    tuned = Path(report["tuned_gguf"])
    assert tuned.name.endswith("q4_k_m.gguf")
    chat = subprocess.run([sys.executable, "-m", "care.cli", "chat", "--model", str(tuned), "--once",
                           "How do I block my card?", "--max-tokens", "16", "--temperature", "0"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert chat.returncode == 0 and chat.stdout.strip()
