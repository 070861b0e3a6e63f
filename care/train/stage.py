"""One training stage on trl's SFTTrainer: the SFTConfig from the recipe, the (Q)LoRA model, the run with
resume and signal handling, the metrics, and the final adapter (`adapter/` with care_adapter.json), written
atomically by rank 0. care.train.sft runs one or two of these.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from care.artifacts import ADAPTER_INFO, adapter_info
from care.errors import TrainingError
from care.io import write_json
from care.progress import on_terminal
from care.train.callbacks import StopSignals, quiet_log_printing, training_callbacks
from care.train.config import Recipe
from care.train.distributed import is_distributed, is_main_process, sharding

log = logging.getLogger(__name__)



@dataclass
class TrainResult:
    output_dir: Path
    adapter_dir: Path | None
    metrics: dict[str, Any] = field(default_factory=dict)
    interrupted: bool = False
    best_checkpoint: str | None = None
    stages: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["output_dir"] = str(self.output_dir)
        d["adapter_dir"] = str(self.adapter_dir) if self.adapter_dir else None
        return d


def sft_config(recipe: Recipe, out: Path, has_val: bool, assistant_only: bool, max_steps: int | None):
    from trl import SFTConfig

    from care.train.modeling import device, precision

    t = recipe.training
    prec = precision(recipe.quant.get("compute_dtype", "auto"))
    on_cpu = device() == "cpu"
    eval_steps = int(t.get("eval_steps") or 50)
    save_steps = int(t.get("save_steps") or eval_steps)
    load_best = bool(t.get("load_best", True)) and has_val
    if load_best and save_steps % eval_steps:
        # The Trainer can only pick a best checkpoint among saved ones evaluated at the same step.
        save_steps = eval_steps * max(1, round(save_steps / eval_steps))
        log.info("save_steps set to %d (a multiple of eval_steps) for best-checkpoint selection", save_steps)
    steps = max_steps if max_steps is not None else int(t.get("max_steps") or -1)
    completion_only = bool(t.get("completion_only", True))
    extra: dict[str, Any] = {}
    if is_distributed():
        # Every LoRA weight gets a gradient each step: no unused-parameter search (it also clashes with
        # gradient checkpointing under DDP).
        extra["ddp_find_unused_parameters"] = False
        if on_cpu:
            extra["ddp_backend"] = "gloo"
    return SFTConfig(
        output_dir=str(out),
        per_device_train_batch_size=int(t["batch"]),
        per_device_eval_batch_size=int(t.get("eval_batch") or t["batch"]),
        gradient_accumulation_steps=int(t.get("grad_accum") or 1),
        learning_rate=float(t["lr"]),
        num_train_epochs=float(t.get("epochs") or 1),
        max_steps=steps if steps and steps > 0 else -1,
        lr_scheduler_type=t.get("scheduler", "cosine"),
        warmup_steps=float(t.get("warmup") or 0),
        weight_decay=float(t.get("weight_decay") or 0.0),
        optim=t.get("optim", "adamw_torch"),
        max_grad_norm=float(t.get("max_grad_norm") or 1.0),
        logging_steps=int(t.get("logging_steps") or 5),
        eval_strategy="steps" if has_val else "no",
        eval_steps=eval_steps if has_val else None,
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=t.get("save_total_limit"),
        load_best_model_at_end=load_best,
        metric_for_best_model="eval_loss" if has_val else None,
        greater_is_better=False if has_val else None,
        seed=int(t.get("seed", 42)),
        data_seed=int(t.get("seed", 42)),
        max_length=int(t["max_length"]),
        packing=bool(t.get("packing", False)),
        assistant_only_loss=completion_only and assistant_only,
        completion_only_loss=completion_only if not assistant_only else None,
        activation_checkpointing=bool(t.get("gradient_checkpointing", False)),
        use_cpu=on_cpu,
        bf16=prec.bf16,
        fp16=prec.fp16,  # autocast + loss scaling over the float32 LoRA weights (peft autocast_adapter_dtype)
        report_to="none",
        dataloader_num_workers=0,
        # Off a terminal the bar would be hundreds of carriage-return frames in a log: LineProgressCallback.
        disable_tqdm=bool(os.environ.get("CARE_NO_PROGRESS")) or not on_terminal(),
        **extra,
    )


def build_model(recipe: Recipe, base: str, quantize: bool, init_adapter: Path | None):
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
    from transformers import set_seed

    from care.train.modeling import load_model, resolve_target_modules

    # LoRA's A matrices are drawn at creation, before the Trainer seeds anything: seed here so that two runs
    # of one recipe start from the same adapter.
    set_seed(int(recipe.training.get("seed", 42)))
    model = load_model(base, recipe.quant, quantize)
    gc = bool(recipe.training.get("gradient_checkpointing", False))
    if quantize and not sharding():
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc)
    elif quantize:
        # FSDP/ZeRO-3 QLoRA (as trl does for sharded QLoRA): prepare_model_for_kbit_training would upcast
        # the norms to fp32, and a sharded flat parameter needs one dtype throughout.
        if gc:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if init_adapter is not None:
        return PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True), None
    lc = recipe.lora
    targets = resolve_target_modules(model, lc.get("target_modules", "all-linear"))
    cfg = LoraConfig(r=int(lc["r"]), lora_alpha=float(lc["alpha"]), lora_dropout=float(lc.get("dropout", 0.0)),
                     bias=lc.get("bias", "none"), use_rslora=bool(lc.get("use_rslora", False)),
                     target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(model, cfg), targets


def run_stage(recipe: Recipe, out: Path, base: str, tokenizer, train_recs, val_recs, *, quantize: bool,
               resume: bool, max_steps: int | None, init_adapter: Path | None, stage: int,
               data_report: dict[str, Any], extra_callbacks: list | None = None) -> TrainResult:
    from transformers.trainer_utils import get_last_checkpoint
    from trl import SFTTrainer

    from care.train.chat_templates import training_template
    from care.train.formatting import to_dataset
    from care.train.metrics import plot_curves, read_metrics, truncate_after

    out.mkdir(parents=True, exist_ok=True)
    final = out / "adapter"
    if (final / ".complete").is_file() and resume:
        log.info("stage %d already finished in %s", stage, out)
        return TrainResult(out, final, json.loads((out / "train_result.json").read_text())["metrics"])
    last = get_last_checkpoint(str(out)) if out.is_dir() else None
    if last and not resume:
        raise TrainingError("The output folder already has checkpoints", path=out,
                            hint="Continue with --resume, or choose another --out folder")
    if resume and not last:
        log.warning("--resume: no checkpoint in %s, starting from the beginning", out)
    metrics_path = out / "metrics.jsonl"
    if is_main_process() and last:
        truncate_after(metrics_path, int(Path(last).name.split("-")[-1]))
    elif is_main_process():
        metrics_path.unlink(missing_ok=True)

    original_template = tokenizer.chat_template
    train_template = training_template(tokenizer) if recipe.training.get("completion_only", True) else None
    assistant_only = train_template is not None
    if recipe.training.get("completion_only", True) and not assistant_only:
        log.warning("no training chat template with {%% generation %%} markers for this model: masking the "
                    "prompt with prompt/completion pairs instead")
    model, targets = build_model(recipe, base, quantize, init_adapter)
    args = sft_config(recipe, out, bool(val_recs), assistant_only, max_steps)
    t = recipe.training
    flag: dict[str, Any] = {}
    metrics_cb, line_cb, stop_cb = training_callbacks(metrics_path, flag, int(t["batch"]) * int(t.get("grad_accum") or 1))
    # Extra callbacks run before the stop check, so a signal they raise stops this very step.
    callbacks = [metrics_cb, line_cb, *(extra_callbacks or []), stop_cb]
    prompt_completion = not assistant_only
    train_ds = to_dataset(train_recs, prompt_completion)
    val_ds = to_dataset(val_recs, prompt_completion) if val_recs else None
    if assistant_only:
        tokenizer.chat_template = train_template  # trl tokenizes the datasets with it in __init__
    try:
        trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds,
                             processing_class=tokenizer, callbacks=callbacks)
    except ValueError as exc:
        raise TrainingError(f"trl could not set up training: {exc}", hint="Check the recipe's training section"
                            ) from exc
    finally:
        # Checkpoints and the adapter keep the model's real template (what it is served with).
        tokenizer.chat_template = original_template
    quiet_log_printing(trainer)
    t0 = time.perf_counter()
    with StopSignals(flag):
        output = trainer.train(resume_from_checkpoint=last if last else None)
    elapsed = time.perf_counter() - t0
    main = is_main_process()
    rows = read_metrics(metrics_path) if main else metrics_cb.rows
    if main:
        plot_curves(rows, out / "loss.png", title=f"{recipe.name} stage {stage}" if stage else recipe.name)
    state = trainer.state
    evals = [r for r in rows if "eval_loss" in r]
    train_rows = [r for r in rows if "loss" in r]
    metrics: dict[str, Any] = {
        "global_step": state.global_step,
        "train_loss": output.training_loss,
        "first_loss": train_rows[0]["loss"] if train_rows else None,
        "last_loss": train_rows[-1]["loss"] if train_rows else None,
        "best_eval_loss": min((r["eval_loss"] for r in evals), default=None),
        "train_runtime_s": round(elapsed, 2),
        "train_rows": len(train_recs),
        "val_rows": len(val_recs),
        "target_modules": targets,
        "quantized": quantize,
        "mixed_precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "no",
    }
    for k in ("tokens_per_s", "samples_per_s", "mean_token_accuracy"):
        vals = [r[k] for r in train_rows if k in r]
        if vals:
            metrics[k] = vals[-1] if k == "mean_token_accuracy" else round(sum(vals) / len(vals), 3)
    if flag.get("signal"):
        ckpt = get_last_checkpoint(str(out))
        log.warning("stopped by %s at step %d; checkpoint %s", flag["signal"], state.global_step, ckpt)
        result = TrainResult(out, None, metrics, interrupted=True, best_checkpoint=state.best_model_checkpoint)
        if main:
            write_json(out / "train_result.json", result.to_dict() | {"checkpoint": ckpt})
        return result
    # The adapter (best by validation loss when there is a validation set: load_best_model_at_end).
    save_adapter(trainer, tokenizer, final, recipe, base, quantize, stage, original_template)
    result = TrainResult(out, final, metrics, best_checkpoint=state.best_model_checkpoint)
    if main:
        write_json(out / "train_result.json", result.to_dict())
    trainer.accelerator.wait_for_everyone()  # no rank moves on (stage 2, exit) before the adapter is on disk
    return result


def save_adapter(trainer, tokenizer, final: Path, recipe: Recipe, base: str, quantize: bool, stage: int,
                  template: str | None) -> None:
    import shutil

    tmp = final.with_name(final.name + ".tmp")
    main = is_main_process()
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    if trainer.is_fsdp_enabled:  # gather the sharded LoRA weights into one adapter file on rank 0
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    # Trainer.save_model: every rank joins (FSDP/ZeRO-3 gather the weights), only rank 0 writes.
    trainer.save_model(str(tmp))
    if not main:
        return
    tokenizer.chat_template = template
    tokenizer.save_pretrained(str(tmp))
    info = adapter_info(
        base_model=base,
        recipe_base=recipe.model.get("base"),
        recipe_name=recipe.name,
        recipe_hash=recipe.hash(),
        recipe_path=str(recipe.path) if recipe.path else None,
        quantized=quantize,
        quant=recipe.quant if quantize else None,
        stage=stage,
        chat_template=template,
        saved_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    write_json(tmp / ADAPTER_INFO, info)
    (tmp / ".complete").write_text("ok\n")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
