"""Trainer callbacks and signal handling for care.train.stage: metrics.jsonl rows, plain progress lines off a
terminal, and SIGINT/SIGTERM turned into "checkpoint after this step, then stop"."""

from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path
from typing import Any

from care.progress import LineProgress
from care.train.distributed import is_main_process

log = logging.getLogger(__name__)


def quiet_log_printing(trainer: Any) -> None:
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


def training_callbacks(metrics_path: Path, stop_flag: dict[str, Any], batch_samples: int):
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


class StopSignals:
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
