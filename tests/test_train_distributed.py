"""`care train` under a multi-process launch: rank 0 alone writes, data is sharded, losses match one process,
resume works; `care merge` refuses a launch; FSDP/ZeRO-3 QLoRA stores 4-bit weights in the compute dtype."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Every row renders to the same number of tokens (checked below), so a step's loss over 2 rows in one process
# (mean over their completion tokens) equals the mean of the two 1-row losses of the 2 ranks: the only
# difference left is fp32 summation order (~1e-6 measured). 1e-4 leaves room for that and still fails if a
# rank trained on other rows (per-step losses of different rows differ by > 1e-3 here).
LOSS_TOL = 1e-4


def _rows() -> list[dict[str, str]]:
    return [{"query": f"How do I fix problem {c}?", "response": f"Step {c}: open the app and tap Help.",
             "domain": "banking"} for c in "ABCDEFGHIJKLMNOP"]


def _recipe(tmp_path: Path, base: Path) -> Path:
    import yaml

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows()), encoding="utf-8")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "ddp", "model": {"base": str(base)},
        "data": {"sources": [{"path": str(data)}], "val_fraction": 0, "balance": "none"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},  # no dropout: ranks draw other masks than one process
        "training": {"batch": 2, "epochs": 1, "logging_steps": 1, "save_steps": 4, "max_length": 96, "lr": 1e-3,
                     "warmup": 0, "scheduler": "constant"}}))
    return recipe


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", CARE_NO_PROGRESS="1", HF_HUB_OFFLINE="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _care(args: list[str], cwd: Path, processes: int = 1) -> subprocess.CompletedProcess:
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
              if processes > 1 else [sys.executable])
    proc = subprocess.run([*launch, "-m", "care", *args], cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert len(steps) == len(set(steps)), f"duplicate metric lines (a second writer?): {steps}"
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path, tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    lengths = {len(tok.apply_chat_template([{"role": "user", "content": r["query"]},
                                            {"role": "assistant", "content": r["response"]}],
                                           tokenize=True, return_dict=True)["input_ids"]) for r in _rows()}
    assert len(lengths) == 1  # the premise of LOSS_TOL
    recipe = _recipe(tmp_path, tiny_llama)
    _care(["train", str(recipe), "--out", "single", "--no-quant"], tmp_path)
    # Same global batch: 2 ranks x 1 row. Stop after the step-4 checkpoint, then lose the run's ending (as a
    # crash would) and resume with the same launch.
    first = _care(["train", str(recipe), "--out", "ddp", "--no-quant", "--set", "training.batch=1",
                   "--max-steps", "4"], tmp_path, processes=2)
    ddp = tmp_path / "ddp"
    ckpt = ddp / "checkpoint-4"
    assert (ckpt / "rng_state_0.pth").is_file() and (ckpt / "rng_state_1.pth").is_file()  # both ranks stepped
    assert len([ln for ln in first.stdout.splitlines() if ln.startswith("{")]) == 1  # one process reports
    import shutil

    shutil.rmtree(ddp / "adapter")
    (ddp / "train_result.json").unlink()
    _care(["train", str(recipe), "--out", "ddp", "--no-quant", "--set", "training.batch=1", "--resume"],
          tmp_path, processes=2)
    single, dist = _losses(tmp_path / "single"), _losses(ddp)
    # 16 rows / global batch 2 = 8 steps in both: had each rank read all rows, the 2-process run takes 16.
    assert sorted(single) == sorted(dist) == list(range(1, 9))
    diffs = [abs(single[s] - dist[s]) for s in single]
    assert max(diffs) <= LOSS_TOL, list(zip(single.values(), dist.values(), strict=True))
    assert (ddp / "adapter" / ".complete").is_file()
    assert json.loads((ddp / "train_result.json").read_text())["metrics"]["global_step"] == 8


@pytest.mark.slow
def test_only_rank_zero_writes(tmp_path, tiny_llama, monkeypatch):
    """In-process, as rank 1 of a launch (the Trainer, seeing no LOCAL_RANK, trains alone and so writes its
    own checkpoint, model card and save_model folder): none of our own files may appear."""
    from care.train.config import load_recipe
    from care.train.sft import train

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("CARE_NO_PROGRESS", "1")
    recipe = load_recipe(_recipe(tmp_path, tiny_llama), overrides=["training.max_steps=1",
                                                                   "training.save_steps=1"])
    out = tmp_path / "rank1"
    result = train(recipe, out, no_quant=True)
    assert result.metrics["global_step"] == 1 and result.metrics["first_loss"] > 0  # rows kept in memory
    written = {p.name for p in out.iterdir()}
    assert "checkpoint-1" in written
    ours = {"metrics.jsonl", "loss.png", "resolved_config.yaml", "data_report.json", "train_result.json", "adapter"}
    assert not written & ours, written


def test_merge_refuses_a_distributed_launch(monkeypatch, capsys, tmp_path):
    from care.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    rc = main(["merge", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and not (tmp_path / "merged").exists()
    assert len(err) <= 2 and "accelerate launch" in err[0], err


@pytest.mark.parametrize("plugin", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", None])
def test_sharded_qlora_stores_4bit_in_compute_dtype(monkeypatch, plugin):
    import torch

    from care.train.modeling import bnb_config

    for var in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(var, raising=False)
    if plugin:
        monkeypatch.setenv(plugin, "true")
    cfg = bnb_config({"compute_dtype": "bfloat16"})
    assert cfg.bnb_4bit_quant_storage == (torch.bfloat16 if plugin else torch.uint8)


@pytest.mark.parametrize(("name", "kind"), [("multi_gpu.yaml", "MULTI_GPU"), ("fsdp_qlora.yaml", "FSDP"),
                                            ("deepspeed_zero3_qlora.yaml", "DEEPSPEED")])
def test_shipped_accelerate_configs_load(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(REPO / "recipes" / "accelerate" / name))
    assert cfg.distributed_type.value == kind and cfg.num_processes >= 2
    if kind == "FSDP":  # QLoRA under FSDP: CPU-efficient loading synced from rank 0, as in PEFT's example
        assert cfg.fsdp_config["fsdp_cpu_ram_efficient_loading"] and cfg.fsdp_config["fsdp_sync_module_states"]
    if kind == "DEEPSPEED":
        assert cfg.deepspeed_config["zero_stage"] == 3
