"""QLoRA / LoRA supervised fine-tuning with trl's SFTTrainer, driven by a recipe.

Output folder: `adapter/` (the final adapter, or the best one by validation loss), `checkpoint-N/`,
`metrics.jsonl` (one line per logging step and evaluation), `loss.png`, `resolved_config.yaml`,
`data_report.json`, `train_result.json`. Two-stage recipes train `stage1/` first (same layout), then stage 2
in the top folder starting from the stage-1 adapter.

SIGINT/SIGTERM finish the current optimizer step, save a checkpoint and return (interrupted=True);
`resume=True` continues from the newest checkpoint with the same data order (the Trainer's seeded sampler
skips the batches already seen, and RNG/optimizer/scheduler states come back from the checkpoint).

Under `accelerate launch` / `torchrun` the same code runs once per process: the Trainer shards each batch
across processes (its dataloader goes through accelerate), DDP averages the gradients, and only rank 0
writes files (the Trainer guards checkpoints itself; care's guards cover metrics.jsonl, loss.png,
resolved_config.yaml, data_report.json, train_result.json and the final adapter).

This module prepares the data and runs the stages; one stage (SFTConfig, model, Trainer run, adapter) is
care.train.stage, its callbacks and signal handling care.train.callbacks.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from care.errors import TrainingError
from care.io import write_json, write_text
from care.train.config import Recipe
from care.train.distributed import is_main_process
from care.train.stage import TrainResult, run_stage

__all__ = ["TrainResult", "prepare_data", "train"]

log = logging.getLogger(__name__)


def prepare_data(recipe: Recipe, tokenizer=None, strict: bool = False):
    """Load, mix and length-filter the recipe's data; returns a DataBundle whose report has token lengths."""
    from care.train.data import build_data, domain_counts
    from care.train.formatting import filter_by_length, percentiles

    bundle = build_data(recipe.data, strict=strict, resolve=recipe.resolve_path)
    if tokenizer is not None:
        max_len = int(recipe.data.get("max_length") or recipe.training["max_length"])
        for i, stage in enumerate(bundle.stages):
            stage.train, lengths = filter_by_length(tokenizer, stage.train, max_len, bundle.bad)
            stage.val, vlengths = filter_by_length(tokenizer, stage.val, max_len, bundle.bad)
            rep = bundle.report["stages"][i]
            rep["train"], rep["val"] = domain_counts(stage.train), domain_counts(stage.val)
            rep["train_tokens"] = percentiles(lengths)
            rep["val_tokens"] = percentiles(vlengths)
        bundle.report["max_length"] = max_len
    for i, stage in enumerate(bundle.stages):
        if not stage.train:
            raise TrainingError(f"Stage {i + 1} has no training rows left after filtering",
                                hint="Raise training.max_length or check the data report's bad rows")
    bundle.report["bad_rows"] = bundle.bad.summary()
    return bundle


def _resolved_precision(recipe: Recipe) -> str:
    """Log the training precision once (with its warning, if any) and return it as a `resolved:` YAML block
    for resolved_config.yaml (the recipe loader ignores that key)."""
    import yaml

    from care.train.precision import resolve_precision, training_device

    dev = training_device()
    prec = resolve_precision(dev, recipe.quant.get("compute_dtype", "auto"))
    log.info("precision on %s: %s compute, %s LoRA weights, loss scaling %s (%s)", dev.label(), prec.compute,
             prec.lora_weights, "on" if prec.loss_scaling else "off", prec.reason)
    if prec.warning:
        log.warning("%s", prec.warning)
    block = {"resolved": {"device": dev.label(), "precision": prec.to_dict()}}
    return "# What training decided on this machine (a record, not a setting):\n" + yaml.safe_dump(
        block, sort_keys=False)


def train(recipe: Recipe, out_dir: str | Path, resume: bool = False, *, strict: bool = False,
          no_quant: bool = False, max_steps: int | None = None, callbacks: list | None = None) -> TrainResult:
    """Fine-tune per `recipe` into `out_dir`. Returns the adapter folder and final metrics."""
    from care.train.modeling import load_tokenizer, resolve_base

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    if "CARE_THREADS" in os.environ:
        torch.set_num_threads(max(1, int(os.environ["CARE_THREADS"])))
    if is_main_process():
        write_text(out / "resolved_config.yaml", recipe.to_yaml() + _resolved_precision(recipe))
    base = resolve_base(recipe.model, recipe.resolve_path)
    tokenizer = load_tokenizer(base)
    if recipe.model.get("chat_template"):
        tpl = recipe.model["chat_template"]
        p = recipe.resolve_path(tpl)
        tokenizer.chat_template = p.read_text(encoding="utf-8") if p.is_file() else tpl
    if not tokenizer.chat_template:
        raise TrainingError(f"The base model '{base}' has no chat template",
                            hint="Set model.chat_template in the recipe (Jinja text or a file)")
    bundle = prepare_data(recipe, tokenizer, strict=strict)
    bundle.report["base_model"] = base
    if is_main_process():
        write_json(out / "data_report.json", bundle.report)
    quantize = bool(recipe.quant.get("load_in_4bit", True)) and not no_quant
    if len(bundle.stages) == 1:
        st = bundle.stages[0]
        result = run_stage(recipe, out, base, tokenizer, st.train, st.val, quantize=quantize, resume=resume,
                            max_steps=max_steps, init_adapter=None, stage=0, data_report=bundle.report,
                            extra_callbacks=callbacks)
        return result
    s1, s2 = bundle.stages
    stage1_steps = (recipe.data.get("stages") or {}).get("stage1_steps")
    r1 = run_stage(recipe, out / "stage1", base, tokenizer, s1.train, s1.val, quantize=quantize, resume=resume,
                    max_steps=max_steps or stage1_steps, init_adapter=None, stage=1, data_report=bundle.report,
                    extra_callbacks=callbacks)
    if r1.interrupted:
        return TrainResult(out, None, r1.metrics, interrupted=True, stages=[r1.to_dict()])
    r2 = run_stage(recipe, out, base, tokenizer, s2.train, s2.val, quantize=quantize, resume=resume,
                    max_steps=max_steps, init_adapter=r1.adapter_dir, stage=2, data_report=bundle.report,
                    extra_callbacks=callbacks)
    r2.stages = [r1.to_dict(), {"metrics": r2.metrics}]
    return r2
