"""Running other programs, in one place: a tool whose output is streamed, and a child worker with a job file.

- `run_tool(cmd, what=...)`: run a program (a llama.cpp tool, the converter, a build step), pass each line of
  its merged stdout+stderr (a tqdm `\\r` update counts as a line) to `on_line`, keep a tail, and turn a
  failure (missing executable, non-zero exit, a signal such as SIGILL, a timeout) into one `ToolError`
  line that names the program, how it ended and the line of its output worth showing (`error_line`).
- `run_worker(module, job, workdir=...)`: the one child-worker protocol. The parent writes `job.json` in
  `workdir` and runs `python -m <module> <job.json>`; the child (`worker_main(handler)`) reads the job,
  calls the handler and writes `result.json` beside it (atomically, care.io); `report_progress(record)`
  in the child prints one prefixed JSON line that the parent hands to `on_progress`. A child that dies
  (a signal, an exit status), reports {"error": ...}, times out or leaves no result raises `WorkerError`.
  A child process is how CARE runs code that may take its process down (a CPU module that dies with
  SIGILL, a broken CUDA setup) or whose peak memory must be its own (care bench).

Standard library only (the llama.cpp build runs before care's dependencies are installed).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import signal as signal_module
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from care.errors import CareError, ToolError, WorkerError

log = logging.getLogger(__name__)

# The line worth showing from a tool's output: the last one that says what went wrong. The union of what the
# converter ("exception", "not supported", "missing"), the quantizer ("failed"), llama-imatrix (llama.cpp's
# " E " log level, a C++ exception's "what()") and the build ("error") each looked for, in two tiers: a line
# naming the error beats a later one that only says something failed (ninja's closing "subcommand failed").
ERROR_RE = re.compile(r"(?-i:\bE\b )|error|exception|what\(\)|No space left", re.I)
FAILED_RE = re.compile(r"failed|not supported|missing|abort", re.I)
# llama.cpp's log prefix ("0.00.400.707 E "), stripped from the line shown.
_LOG_PREFIX_RE = re.compile(r"^\s*[\d.]+ [EWIDT]\s+")
MAX_ERROR_CHARS = 300
DEFAULT_HINT = "CARE_DEBUG=1 shows its full output"

PROGRESS_PREFIX = "CARE-PROGRESS "
JOB_FILE = "job.json"
RESULT_FILE = "result.json"


def error_line(lines: Sequence[str]) -> str | None:
    """The one line of a tool's (or child's) output worth showing: the last that names an error (ERROR_RE),
    else the last that says something failed (FAILED_RE), else the last non-blank one; llama.cpp's log prefix
    stripped, at most 300 characters. None when there is no output."""
    kept = [ln.strip() for ln in lines if ln.strip()]
    if not kept:
        return None
    line = next((ln for ln in reversed(kept) if ERROR_RE.search(ln)), None) or \
        next((ln for ln in reversed(kept) if FAILED_RE.search(ln)), kept[-1])
    return _LOG_PREFIX_RE.sub("", line).strip()[:MAX_ERROR_CHARS]


def signal_name(returncode: int) -> str | None:
    """"SIGILL" for a process killed by signal 4 (returncode -4); None for a normal exit."""
    if returncode >= 0:
        return None
    try:
        return signal_module.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def how_it_ended(returncode: int) -> str:
    """"exit 1", or "killed by SIGILL"."""
    name = signal_name(returncode)
    return f"killed by {name}" if name else f"exit {returncode}"


@dataclass(frozen=True)
class ToolRun:
    returncode: int
    lines: list[str]  # the tail of its output that was kept (`keep` lines)
    duration: float  # seconds


def _split_lines(stream: IO[bytes]) -> Iterator[str]:
    """Lines of a byte stream as they arrive, split at \\n and at \\r (progress bars redraw with \\r)."""
    buf = b""
    read = getattr(stream, "read1", stream.read)
    while chunk := read(65536):
        buf += chunk
        *parts, buf = re.split(rb"[\r\n]", buf)
        for raw in parts:
            if raw.strip():
                yield raw.decode("utf-8", "replace")
    if buf.strip():
        yield buf.decode("utf-8", "replace")


def run_tool(cmd: Sequence[str | os.PathLike[str]], *, what: str, on_line: Callable[[str], None] | None = None,
             env: dict[str, str] | None = None, cwd: str | os.PathLike[str] | None = None,
             timeout: float | None = None, hint: str | None = None, path: object | None = None, keep: int = 200,
             watch: Callable[[int], None] | None = None, poll_s: float = 0.05) -> ToolRun:
    """Run `cmd`, streaming its merged stdout+stderr line by line to `on_line` (and the debug log); return
    its exit status, the last `keep` lines and its duration.

    Raises ToolError (one line: `what`, the exit status or signal, `error_line` of the output; `hint` or
    DEFAULT_HINT as the fix; `path` as the file) when it cannot start, exits non-zero, dies by a signal or
    runs past `timeout` seconds. `watch(pid)`, if given, is called every `poll_s` seconds while it runs
    (from another thread); an exception from it kills the program and is raised here instead."""
    argv = [os.fspath(c) for c in cmd]
    hint = hint or DEFAULT_HINT
    log.info("$ %s", " ".join(argv))
    t0 = time.monotonic()
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=cwd)
    except OSError as exc:
        why = "not found" if isinstance(exc, FileNotFoundError) else (exc.strerror or str(exc))
        raise ToolError(f"Cannot run {what}: {argv[0]} {why}", what=what, hint=hint, path=path or argv[0]) from exc
    assert proc.stdout is not None
    tail: collections.deque[str] = collections.deque(maxlen=keep)
    state: dict[str, Any] = {"timed_out": False, "raised": None}
    done = threading.Event()

    def monitor() -> None:
        while not done.wait(poll_s):
            if timeout is not None and time.monotonic() - t0 > timeout:
                state["timed_out"] = True
                proc.kill()
                return
            if watch is not None:
                try:
                    watch(proc.pid)
                except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread below
                    state["raised"] = exc
                    proc.kill()
                    return

    thread = threading.Thread(target=monitor, daemon=True) if timeout is not None or watch is not None else None
    if thread is not None:
        thread.start()
    try:
        for line in _split_lines(proc.stdout):
            tail.append(line)
            log.debug("%s: %s", what, line)
            if on_line is not None:
                on_line(line)
        rc = proc.wait()
    except BaseException:
        proc.kill()  # Ctrl-C or a failing on_line: never leave the program running
        proc.wait()
        raise
    finally:
        done.set()
        if thread is not None:
            thread.join()
        proc.stdout.close()
    lines = list(tail)
    if state["raised"] is not None:
        raise state["raised"]
    if state["timed_out"]:
        raise ToolError(f"{what} did not finish within {timeout:g} s: {error_line(lines) or 'no output'}",
                        what=what, returncode=rc, lines=lines, detail=error_line(lines), timed_out=True,
                        hint=hint, path=path)
    if rc != 0:
        detail = error_line(lines)
        raise ToolError(f"{what} failed ({how_it_ended(rc)}): {detail or 'no output'}", what=what, returncode=rc,
                        signal=signal_name(rc), lines=lines, detail=detail, hint=hint, path=path)
    return ToolRun(rc, lines, time.monotonic() - t0)


# -- the child-worker protocol ------------------------------------------------------------------------------

def _read_result(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def run_worker(module: str, job: dict[str, Any], *, workdir: Path, timeout: float | None = None,
               env: dict[str, str] | None = None, on_progress: Callable[[dict[str, Any]], None] | None = None,
               python: str = sys.executable, what: str | None = None, on_line: Callable[[str], None] | None = None,
               watch: Callable[[int], None] | None = None, poll_s: float = 0.05,
               hint: str | None = None) -> dict[str, Any]:
    """Run `python -m <module> <workdir>/job.json` (a module whose main is `worker_main(handler)`) and return
    the dict the handler returned (its result.json).

    Progress records (report_progress in the child) go to `on_progress`; every other output line to
    `on_line`. Raises WorkerError (one line naming `what` (default: the module), the signal or exit status
    and the child's error or last error line) when the child dies, exits non-zero, reports an error, runs past
    `timeout` or leaves no result. `watch` as in run_tool (an exception from it stops the child)."""
    what = what or module
    workdir = Path(workdir)
    from care.io import write_json

    job_path = write_json(workdir / JOB_FILE, job)
    result_path = workdir / RESULT_FILE
    result_path.unlink(missing_ok=True)
    output: collections.deque[str] = collections.deque(maxlen=200)

    def line(text: str) -> None:
        if text.startswith(PROGRESS_PREFIX):
            try:
                record = json.loads(text[len(PROGRESS_PREFIX):])
            except ValueError:
                record = None
            if isinstance(record, dict):
                if on_progress is not None:
                    on_progress(record)
                return
        output.append(text)
        if on_line is not None:
            on_line(text)

    child_env = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"}
    try:
        run_tool([python, "-m", module, str(job_path)], what=what, on_line=line, env=child_env, timeout=timeout,
                 hint=hint, watch=watch, poll_s=poll_s)
    except ToolError as exc:
        result = _read_result(result_path)
        detail = error_line(list(output))
        if result is not None and "error" in result and exc.returncode is not None and exc.returncode > 0 \
                and not exc.timed_out:
            detail = str(result["error"])
            message = f"{what} failed: {detail}"
        elif exc.timed_out:
            message = f"{what} did not finish within {timeout:g} s: {detail or 'no output'}"
        elif exc.returncode is None:
            raise WorkerError(exc.message, what=what, hint=exc.hint, path=exc.path) from exc
        else:
            message = f"{what} failed ({how_it_ended(exc.returncode)}): {detail or 'no output'}"
        raise WorkerError(message, what=what, returncode=exc.returncode, signal=exc.signal, lines=list(output),
                          detail=detail, timed_out=exc.timed_out, result=result, hint=exc.hint,
                          path=result_path) from exc
    result = _read_result(result_path)
    if result is None:
        detail = error_line(list(output))
        raise WorkerError(f"{what} exited 0 but left no {RESULT_FILE}: {detail or 'no output'}", what=what,
                          returncode=0, lines=list(output), detail=detail, hint=hint or DEFAULT_HINT,
                          path=result_path)
    if "error" in result:
        raise WorkerError(f"{what} failed: {result['error']}", what=what, returncode=0, lines=list(output),
                          detail=str(result["error"]), result=result, hint=hint or DEFAULT_HINT, path=result_path)
    return result


def report_progress(record: dict[str, Any]) -> None:
    """In a worker: one progress record for the parent's `on_progress` (a prefixed JSON line on stdout)."""
    sys.stdout.write(PROGRESS_PREFIX + json.dumps(record, default=str) + "\n")
    sys.stdout.flush()


def worker_main(handler: Callable[[dict[str, Any]], dict[str, Any]], argv: Sequence[str] | None = None) -> int:
    """A worker's main: read the job file named by argv[0] (default: sys.argv[1:]), call `handler(job)` and
    write its dict to result.json beside the job (atomically). An exception becomes {"error": "<one line>"}
    (its traceback on stderr) and exit code 1."""
    from care.io import write_json

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        sys.stderr.write("usage: python -m <worker module> <job.json>\n")
        return 2
    job_path = Path(args[0])
    result_path = job_path.with_name(RESULT_FILE)
    try:
        job = json.loads(job_path.read_text(encoding="utf-8"))
        result = handler(job)
        if not isinstance(result, dict):
            raise TypeError(f"the worker's handler returned {type(result).__name__}, not a dict")
    except Exception as exc:  # noqa: BLE001 - every failure becomes the result the parent reads
        traceback.print_exc(file=sys.stderr)
        message = exc.one_line() if isinstance(exc, CareError) else f"{type(exc).__name__}: {exc}"
        write_json(result_path, {"error": message.replace("\n", " ")[:2000]})
        return 1
    write_json(result_path, result)
    return 0
