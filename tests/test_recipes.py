"""Every shipped recipe loads, says how to run it, matches its paper's settings, has a smoke variant that fits
this CPU, and (slow) runs end to end: train -> merge -> export -> verify -> a chat reply -> eval."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
SAMPLES = REPO / "care" / "data" / "samples"

# The settings each paper states (issue 7). A recipe that drifts from its paper fails here.
PAPER = {
    "care": {
        "lora.r": 8, "lora.alpha": 32, "lora.dropout": 0.05, "lora.bias": "none",
        "quant.load_in_4bit": True, "quant.quant_type": "nf4", "data.balance": "downsample",
        "export.quants": ["q4_k_m"], "eval.bench": ["medmcqa", "mmlu_medical", "pubmedqa"],
        "model.base": "microsoft/Phi-3.5-mini-instruct",
    },
    "med-nirvana": {
        "lora.r": 16, "lora.alpha": 16, "lora.dropout": 0.0, "lora.use_rslora": True,
        "lora.target_modules": "all-linear", "training.lr": 3e-4, "training.weight_decay": 0.01,
        "training.batch": 4, "training.warmup": 10, "training.max_length": 2048,
        "training.optim": "paged_adamw_8bit", "training.scheduler": "linear",
    },
    "pubmedqa": {
        "lora.r": 16, "lora.alpha": 32, "lora.dropout": 0.05, "training.epochs": 4, "training.lr": 1e-4,
        "training.scheduler": "cosine", "training.warmup": 0.03, "training.eval_steps": 50,
        "data.val_fraction": 0.1, "training.completion_only": True, "eval.generate": ["pubmedqa"],
    },
    "customer-service": {
        "lora.r": 32, "lora.alpha": 16, "lora.dropout": 0.1,
        "data.sources.0.columns": {"query": "text", "response": "completion"},
    },
}


def _get(tree, dotted: str):
    node = tree
    for part in dotted.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def _load(path: Path, smoke: bool):
    from care.train.config import load_recipe

    return load_recipe(path, smoke=smoke)


def test_the_four_recipes_ship():
    assert {p.stem for p in RECIPES} >= set(PAPER)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_header_gives_the_commands(path: Path):
    head = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        head.append(line)
    text = "\n".join(head)
    rel = f"recipes/{path.name}"
    assert f"care train {rel}" in text, "the header must give the exact training command"
    assert f"care demo --recipe {rel} --smoke" in text, "the header must give the one-command smoke run"
    for step in ("care merge", "care export gguf", "care eval"):
        assert step in text, f"the header must show the {step} step"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_matches_its_paper(path: Path):
    recipe = _load(path, smoke=False)
    tree = recipe.to_dict()
    for key, want in PAPER.get(path.stem, {}).items():
        assert _get(tree, key) == want, f"{path.name}: {key}"
    # Full scale names a real base model (a hub id or a folder), never the embedded smoke model.
    assert recipe.model["base"] not in (None, "embedded", "default")


def test_med_nirvana_is_two_stage_with_k_one_third():
    recipe = _load(REPO / "recipes" / "med-nirvana.yaml", smoke=False)
    assert recipe.data["stages"]["mix_k"] == pytest.approx(1 / 3, abs=1e-3)
    stages = {int(s.get("stage", 1)) for s in recipe.data["sources"]}
    assert stages == {1, 2}
    stage1_readers = {s.get("reader") for s in recipe.data["sources"] if s.get("stage") == 1}
    assert {"medmcqa", "pubmedqa"} <= stage1_readers


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_smoke_variant_fits_this_cpu(path: Path):
    recipe = _load(path, smoke=True)
    assert recipe.model["base"] == "embedded" or recipe.resolve_path(recipe.model["base"]).exists()
    steps = int(recipe.training["max_steps"])
    assert 1 <= steps <= 64, "smoke runs are a few dozen steps"
    assert recipe.training["optim"] in ("adamw_torch", "adamw_torch_fused", "sgd"), \
        "bitsandbytes' paged/8-bit optimizers need a GPU"
    limit = (recipe.eval or {}).get("limit")
    assert limit is not None and limit <= 10, "smoke evals use a few items"
    # Smoke keeps the paper's LoRA shape: only size knobs change.
    full = _load(path, smoke=False)
    assert recipe.lora == full.lora


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_smoke_data_builds(path: Path, shared_data):
    from care.train.data import build_data

    recipe = _load(path, smoke=True)
    bundle = build_data(recipe.data, resolve=recipe.resolve_path)
    assert bundle.bad.rows == []
    for stage in bundle.stages:
        assert 10 <= len(stage.train) <= 200
    if path.stem == "care":
        counts = bundle.report["stages"][0]["after_balance"]
        assert set(counts) == {"banking", "telecom", "medical"}
        assert len(set(counts.values())) == 1, "CARE balances every domain to the smallest"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_local_data_paths_exist(path: Path):
    """Files the recipe ships with (samples) resolve from the recipes folder; only user-supplied training
    splits that ../shared/data lacks may be missing, and the header must say so."""
    recipe = _load(path, smoke=False)
    header = path.read_text(encoding="utf-8")
    for src in recipe.data["sources"]:
        if not src.get("path"):
            continue
        p = recipe.resolve_path(src["path"])
        if "samples" in str(src["path"]):
            assert p.is_file(), p
        elif not p.exists():
            assert "not hold" in header or "not in" in header or "your own" in header, p
    test_file = (recipe.eval or {}).get("test_file")
    if test_file:
        assert recipe.resolve_path(test_file).is_file()


# -- the shipped sample data ---------------------------------------------------------------------------------

def _rows(domain: str) -> list[dict]:
    return [json.loads(line) for line in (SAMPLES / f"{domain}.jsonl").read_text(encoding="utf-8").splitlines()
            if line.strip()]


@pytest.mark.parametrize("domain", ["banking", "telecom", "medical"])
def test_sample_rows_are_complete(domain: str):
    rows = _rows(domain)
    assert len(rows) >= 30
    ids = [r["id"] for r in rows]
    assert len(set(ids)) == len(ids)
    for r in rows:
        assert set(r) == {"id", "query", "response", "domain"}
        assert r["domain"] == domain
        assert len(r["query"]) >= 10 and len(r["response"]) >= 80
        assert r["response"].strip() == r["response"]
    assert len({r["query"].casefold() for r in rows}) == len(rows)


def test_medical_samples_are_cautious():
    """A clinic assistant never diagnoses: every medical answer points to a person who can help."""
    refer = re.compile(r"health worker|doctor|pharmacist|clinic|emergency|nurse|care team|medical (care|advice)"
                       r"|urgent care|crisis line", re.I)
    diagnose = re.compile(r"(?<!if )\byou (probably |definitely |likely )?(have|are suffering from) (a |an )?[\w ]{0,20}"
                          r"(infection|disease|diabetes|cancer|flu|virus|itis|stroke|attack)\b"
                          r"|\bthis is (definitely|certainly)\b", re.I)
    for r in _rows("medical"):
        assert refer.search(r["response"]), r["id"]
        assert not diagnose.search(r["response"]), r["id"]


def test_banking_samples_never_ask_for_secrets():
    ask = re.compile(r"(?<!to )(send|tell|give) (me|us) your (pin|password|full card number)", re.I)
    for r in _rows("banking"):
        assert not ask.search(r["response"]), r["id"]


def test_customer_service_files():
    train = json.loads((SAMPLES / "customer_service_train.json").read_text(encoding="utf-8"))
    test = json.loads((SAMPLES / "customer_service_test.json").read_text(encoding="utf-8"))
    for rows in (train, test):
        assert rows and all(set(r) == {"text", "completion"} and r["text"] and r["completion"] for r in rows)
    assert not {r["text"] for r in train} & {r["text"] for r in test}, "test items must not be trained on"


# -- end to end ---------------------------------------------------------------------------------------------

# CI runs the CARE recipe end to end (3-9 min each on 2 cores); the other three share its code path, and their
# data, header, paper settings and CPU fit are checked above for each. CARE_ALL_RECIPES=1 runs all four.
_ALL = os.environ.get("CARE_ALL_RECIPES") == "1"


@pytest.mark.slow
@pytest.mark.parametrize("path", [p if p.stem == "care" or _ALL else pytest.param(p, marks=pytest.mark.skip(
    reason="one recipe end to end in CI (care); CARE_ALL_RECIPES=1 runs this one too")) for p in RECIPES],
    ids=lambda p: p.stem)
def test_smoke_recipe_end_to_end(path: Path, tmp_path, shared_data):
    """train -> merge -> export (verified) -> chat replies from the new GGUF -> eval on a few items."""
    from care.pipeline import PipelineOptions, run_pipeline

    recipe = _load(path, smoke=True)
    rep = run_pipeline(recipe, tmp_path / "run", smoke=True,
                       options=PipelineOptions(eval_limit=2, max_tokens=24, threads=1))
    assert rep.status == "done"
    statuses = {s.name: s.status for s in rep.stages}
    assert statuses == {"train": "done", "merge": "done", "export": "done", "before_after": "done", "eval": "done"}
    tuned = Path(rep.tuned_gguf)
    assert tuned.is_file() and tuned.read_bytes()[:4] == b"GGUF"
    assert all(qa["after"] for qa in rep.before_after), "the new model must answer"
    train = rep.stage("train").details["metrics"]
    assert train["global_step"] == recipe.training["max_steps"]
    saved = json.loads((tmp_path / "run" / "demo_report.json").read_text(encoding="utf-8"))
    assert saved["status"] == "done" and [s["status"] for s in saved["stages"]] == ["done"] * 5
    ev = rep.stage("eval").details
    assert ev.get("mc") or ev.get("generation")
