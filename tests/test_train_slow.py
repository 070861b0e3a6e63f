"""End to end on the real model: QLoRA on the embedded SmolLM2-135M with ../shared data, loss falls, merge holds."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_qlora_smollm2_loss_falls_and_merges(tmp_path, shared_data):
    from care.train.config import recipe_from_dict
    from care.train.merge import merge_adapter
    from care.train.metrics import read_metrics
    from care.train.sft import train

    bitext = next((shared_data / "bitext_customer_support").glob("*.csv"))
    recipe = recipe_from_dict({
        "name": "slow-smollm2",
        "model": {"base": "embedded"},
        "data": {"sources": [{"reader": "bitext", "path": str(bitext), "limit": 16, "domain": "general",
                              "options": {"placeholders": "strip"}}],
                 "val_fraction": 0.0, "balance": "none"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "training": {"max_steps": 8, "batch": 4, "lr": 1e-3, "warmup": 0, "scheduler": "constant",
                     "logging_steps": 1, "save_steps": 8, "max_length": 384},
    })
    res = train(recipe, tmp_path / "run")
    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 8 and res.metrics["quantized"]
    # Steps 5-8 see the same 16 rows again (second epoch): their loss is clearly below the first epoch's.
    first, second = sum(losses[:4]) / 4, sum(losses[4:]) / 4
    assert second < first - 0.1, losses
    report = merge_adapter(res.adapter_dir, tmp_path / "merged", method="both")
    assert report.method == "dequantize" and report.top1_agreement == 1.0
