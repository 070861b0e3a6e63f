"""Quiet, honest progress: periodic one-line progress off a terminal, third-party warnings only with -v."""

from __future__ import annotations

import logging
import subprocess
import sys

from care.progress import LineProgress, fmt_duration


def test_line_progress_is_periodic_plain_lines(caplog, monkeypatch):
    clock = {"t": 100.0}
    monkeypatch.setattr("care.progress.time.monotonic", lambda: clock["t"])
    line = LineProgress("eval tuned · medqa", 10, every_s=15)
    logger = logging.getLogger("care.progress")
    # The CLI stops it propagating to the root logger (where caplog listens): listen on it directly.
    monkeypatch.setattr(logger, "propagate", False)
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="care.progress"):
            for i in range(1, 11):
                clock["t"] += 4.0
                line.advance(loss=1.0 / i)
    finally:
        logger.removeHandler(caplog.handler)
    messages = [r.getMessage() for r in caplog.records]
    # 40 s of work, a line every 15 s at most, plus the final one
    assert len(messages) == 3 and messages[-1].startswith("eval tuned · medqa: 10/10")
    assert "ETA 0:" in messages[0] and "loss" in messages[0] and "\r" not in "".join(messages)
    assert "ETA" not in messages[-1] and "elapsed 0:40" in messages[-1]
    assert fmt_duration(3725) == "1:02:05"


def _logging_output(verbose: bool) -> str:
    code = ("import logging, warnings; from care.cli import _setup_logging; "
            f"_setup_logging({verbose}); "
            "logging.getLogger('bitsandbytes.backends.cpu.ops').warning('Please pip install kernels'); "
            "warnings.warn('old API', FutureWarning); "
            "logging.getLogger('care.train.sft').warning('care says: check your data'); "
            "logging.getLogger('care.progress').info('train: step 1/2')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stderr


def test_third_party_warnings_only_with_verbose():
    quiet = _logging_output(False)
    assert "care says: check your data" in quiet and "train: step 1/2" in quiet
    assert "kernels" not in quiet and "old API" not in quiet
    loud = _logging_output(True)
    assert "kernels" in loud and "old API" in loud
