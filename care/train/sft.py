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
writes files (the Trainer guards checkpoints itself; the guards here cover metrics.jsonl, loss.png,
resolved_config.yaml, data_report.json, train_result.json and the final adapter).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from care.errors import TrainingError
from care.io import write_json, write_text
from care.progress import LineProgress, on_terminal
from care.train.config import Recipe
from care.train.distributed import is_distributed, is_main_process, sharding

log = logging.getLogger(__name__)

ADAPTER_INFO = "care_adapter.json"


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


# -- data ------------------------------------------------------------------------------------------------

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


def _quiet_log_printing(trainer: Any) -> None:
    """Keep the tqdm bar (stderr, with ETA) but stop transformers writing each log dict to stdout:
    metrics already go to metrics.jsonl, and `care demo` / `care train` stdout must stay readable."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class _BarOnly(ProgressCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            return None

    handler = trainer.callback_handler
    for cb in list(handler.callbacks):
        if type(cb) is PrinterCallback:
            handler.remove_callback(cb)
        elif type(cb) is ProgressCallback:
            handler.remove_callback(cb)
            handler.add_callback(_BarOnly())


# -- callbacks --------------------------------------------------------------------------------------------

def _callbacks(metrics_path: Path, stop_flag: dict[str, Any], batch_samples: int):
    from transformers import TrainerCallback

    class MetricsCallback(TrainerCallback):
        """One JSON line per log event, with throughput computed between log events. Every process keeps
        the rows (the logged loss is already averaged over processes); only the main one writes them."""

        def __init__(self) -> None:
            self.t = time.perf_counter()
            self.step = 0
            self.tokens = 0.0
            self.rows: list[dict[str, Any]] = []

        def on_train_begin(self, args, state, control, **kw):
            self.t, self.step = time.perf_counter(), state.global_step
            self.tokens = 0.0

        def on_log(self, args, state, control, logs=None, **kw):
            logs = dict(logs or {})
            now = time.perf_counter()
            row: dict[str, Any] = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4),
                                   "time": round(time.time(), 3)}
            if "loss" in logs:
                dt = max(now - self.t, 1e-9)
                tokens = float(logs.get("num_tokens", 0.0))
                if self.tokens and tokens >= self.tokens:
                    row["tokens_per_s"] = round((tokens - self.tokens) / dt, 2)
                row["samples_per_s"] = round((state.global_step - self.step) * batch_samples / dt, 3)
                self.t, self.step, self.tokens = now, state.global_step, tokens
            for k, v in logs.items():
                if isinstance(v, (int, float)):
                    row[k] = v
            self.rows.append(row)
            if is_main_process():
                with metrics_path.open("a", encoding="utf-8") as fh:
                    fh.write(json.dumps(row) + "\n")

    class LineProgressCallback(TrainerCallback):
        """Off a terminal: one line per logging step (step/total, loss, ETA) instead of the tqdm bar."""

        def __init__(self) -> None:
            self.line: LineProgress | None = None

        def on_train_begin(self, args, state, control, **kw):
            self.line = LineProgress("train", state.max_steps, every_s=0, unit="step ")
            self.line.restart_at(state.global_step)

        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            if self.line is None or args.disable_tqdm is False:
                return
            if "loss" in logs:
                self.line.update(state.global_step, loss=float(logs["loss"]), lr=float(logs.get("learning_rate", 0)))
            elif "eval_loss" in logs:
                self.line.update(state.global_step, force=True, eval_loss=float(logs["eval_loss"]))

    class StopCallback(TrainerCallback):
        """Turns SIGINT/SIGTERM into 'save a checkpoint now and stop' at the end of the current step."""

        def on_step_end(self, args, state, control, **kw):
            if stop_flag.get("signal"):
                control.should_save = True
                control.should_training_stop = True
                stop_flag["step"] = state.global_step
            return control

    return [MetricsCallback(), LineProgressCallback(), StopCallback()]


class _Signals:
    """Install SIGINT/SIGTERM handlers that only set a flag; a second Ctrl-C aborts at once."""

    def __init__(self, flag: dict[str, Any]) -> None:
        self.flag = flag
        self.old: dict[int, Any] = {}

    def _handle(self, signum, frame):  # noqa: ARG002
        if self.flag.get("signal"):
            raise KeyboardInterrupt
        self.flag["signal"] = signal.Signals(signum).name
        log.warning("%s received: saving a checkpoint after this step (again to abort now)", self.flag["signal"])

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self.old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)


# -- training ---------------------------------------------------------------------------------------------

def _sft_config(recipe: Recipe, out: Path, has_val: bool, assistant_only: bool, max_steps: int | None):
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
        # Off a terminal the bar would be hundreds of carriage-return frames in the log: _LineProgress instead.
        disable_tqdm=bool(os.environ.get("CARE_NO_PROGRESS")) or not on_terminal(),
        **extra,
    )


def _build_model(recipe: Recipe, base: str, quantize: bool, init_adapter: Path | None):
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


def _run_stage(recipe: Recipe, out: Path, base: str, tokenizer, train_recs, val_recs, *, quantize: bool,
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
    model, targets = _build_model(recipe, base, quantize, init_adapter)
    args = _sft_config(recipe, out, bool(val_recs), assistant_only, max_steps)
    t = recipe.training
    flag: dict[str, Any] = {}
    metrics_cb, line_cb, stop_cb = _callbacks(metrics_path, flag, int(t["batch"]) * int(t.get("grad_accum") or 1))
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
    _quiet_log_printing(trainer)
    t0 = time.perf_counter()
    with _Signals(flag):
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
    _save_adapter(trainer, tokenizer, final, recipe, base, quantize, stage, original_template)
    result = TrainResult(out, final, metrics, best_checkpoint=state.best_model_checkpoint)
    if main:
        write_json(out / "train_result.json", result.to_dict())
    trainer.accelerator.wait_for_everyone()  # no rank moves on (stage 2, exit) before the adapter is on disk
    return result


def _save_adapter(trainer, tokenizer, final: Path, recipe: Recipe, base: str, quantize: bool, stage: int,
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
    info = {
        "base_model": base,
        "recipe_base": recipe.model.get("base"),
        "recipe_name": recipe.name,
        "recipe_hash": recipe.hash(),
        "recipe_path": str(recipe.path) if recipe.path else None,
        "quantized": quantize,
        "quant": recipe.quant if quantize else None,
        "stage": stage,
        "chat_template": template,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_json(tmp / ADAPTER_INFO, info)
    (tmp / ".complete").write_text("ok\n")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


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
        result = _run_stage(recipe, out, base, tokenizer, st.train, st.val, quantize=quantize, resume=resume,
                            max_steps=max_steps, init_adapter=None, stage=0, data_report=bundle.report,
                            extra_callbacks=callbacks)
        return result
    s1, s2 = bundle.stages
    stage1_steps = (recipe.data.get("stages") or {}).get("stage1_steps")
    r1 = _run_stage(recipe, out / "stage1", base, tokenizer, s1.train, s1.val, quantize=quantize, resume=resume,
                    max_steps=max_steps or stage1_steps, init_adapter=None, stage=1, data_report=bundle.report,
                    extra_callbacks=callbacks)
    if r1.interrupted:
        return TrainResult(out, None, r1.metrics, interrupted=True, stages=[r1.to_dict()])
    r2 = _run_stage(recipe, out, base, tokenizer, s2.train, s2.val, quantize=quantize, resume=resume,
                    max_steps=max_steps, init_adapter=r1.adapter_dir, stage=2, data_report=bundle.report,
                    extra_callbacks=callbacks)
    r2.stages = [r1.to_dict(), {"metrics": r2.metrics}]
    return r2
