"""care.proc: the one way to run a tool (streamed lines, one-line failures) and the one child-worker protocol.

Real child processes: a program that exits 1, one killed by SIGILL, one that runs too long, a worker that
reports progress, raises, dies by a signal or writes no result."""

from __future__ import annotations

import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest

import care
from care.errors import CareError, ToolError, WorkerError
from care.proc import error_line, report_progress, run_tool, run_worker, worker_main

PY = sys.executable


def py(code: str) -> list[str]:
    return [PY, "-c", textwrap.dedent(code)]


# -- error_line -------------------------------------------------------------------------------------------
def test_error_line_picks_the_last_error_looking_line():
    lines = ["loading model", "llama_model_load: tensor 'x' is missing", "exiting"]
    assert error_line(lines) == "llama_model_load: tensor 'x' is missing"
    # A line naming the error beats a later one that only says something failed.
    build = ["[12/80] Building CXX object ggml.o", "ggml.c:12:3: error: 'foo' undeclared", "FAILED: ggml.o",
             "ninja: build stopped: subcommand failed."]
    assert error_line(build) == "ggml.c:12:3: error: 'foo' undeclared"
    assert error_line(["x", "OSError: [Errno 28] No space left on device", "cleanup failed"]) == \
        "OSError: [Errno 28] No space left on device"
    assert error_line(["convert: ok", "NotImplementedError: Architecture Foo not supported", "bye"]) == \
        "NotImplementedError: Architecture Foo not supported"
    assert error_line(["main: quantizing", "main: failed to quantize model", "done"]) == \
        "main: failed to quantize model"
    assert error_line(["x", "terminate called after throwing: what(): bad alloc", "Aborted"]) == \
        "terminate called after throwing: what(): bad alloc"


def test_error_line_strips_llama_cpp_log_prefix_and_reads_its_E_level_case_sensitively():
    lines = ["0.00.100.001 I loading", "0.00.400.707 E  failed to open calibration.txt", "0.00.400.800 I bye"]
    assert error_line(lines) == "failed to open calibration.txt"
    # A lone lower-case "e " is a word, not llama.cpp's error level: the last line is shown instead.
    assert error_line(["call me e sometime", "the end"]) == "the end"


def test_error_line_falls_back_to_the_last_line_and_none_without_output():
    assert error_line(["step 1", "", "step 2  ", "   "]) == "step 2"
    assert error_line([]) is None and error_line(["", "  "]) is None
    assert len(error_line(["error " + "x" * 1000]) or "") == 300


# -- run_tool ---------------------------------------------------------------------------------------------
def test_run_tool_streams_lines_including_carriage_return_updates(tmp_path):
    seen: list[str] = []
    run = run_tool(py("""
        import sys
        sys.stdout.write("10%\\r50%\\r100%\\n"); sys.stdout.flush()
        sys.stderr.write("to stderr\\n")
        print("done")
    """), what="counter", on_line=seen.append, cwd=tmp_path)
    assert run.returncode == 0 and run.duration > 0
    assert seen == ["10%", "50%", "100%", "to stderr", "done"] or seen == ["10%", "50%", "100%", "done", "to stderr"]
    assert run.lines == seen


def test_run_tool_failure_is_one_line_naming_the_tool_exit_and_error():
    with pytest.raises(ToolError) as err:
        run_tool(py("""
            import sys
            print("loading")
            print("error: the vocabulary is missing a token", file=sys.stderr)
            print("cleanup")
            sys.exit(3)
        """), what="llama-quantize", hint="Re-export the f16 GGUF")
    e = err.value
    assert isinstance(e, CareError) and e.returncode == 3 and e.signal is None
    assert str(e) == "llama-quantize failed (exit 3): error: the vocabulary is missing a token"
    assert e.one_line().endswith("Re-export the f16 GGUF.") and "\n" not in e.one_line()
    assert e.lines[-1] == "cleanup"


def test_run_tool_names_the_signal_that_killed_it():
    with pytest.raises(ToolError) as err:
        run_tool(py("import os, signal; print('loaded module', flush=True); os.kill(os.getpid(), signal.SIGILL)"),
                 what="llama-simple")
    assert err.value.signal == "SIGILL" and err.value.returncode == -signal.SIGILL
    assert err.value.message == "llama-simple failed (killed by SIGILL): loaded module"


def test_run_tool_missing_executable(tmp_path):
    with pytest.raises(ToolError) as err:
        run_tool([tmp_path / "no-such-tool", "--help"], what="llama-imatrix")
    assert "Cannot run llama-imatrix" in err.value.message and "not found" in err.value.message
    assert err.value.returncode is None


def test_run_tool_timeout_kills_the_program():
    t0 = time.monotonic()
    with pytest.raises(ToolError) as err:
        run_tool(py("import time; print('working', flush=True); time.sleep(30)"), what="slow", timeout=0.5)
    assert time.monotonic() - t0 < 10
    assert err.value.timed_out and err.value.message == "slow did not finish within 0.5 s: working"


def test_run_tool_watch_can_stop_the_program():
    pids: list[int] = []

    class Over(Exception):
        pass

    def watch(pid: int) -> None:
        pids.append(pid)
        if len(pids) >= 3:
            raise Over("too big")

    t0 = time.monotonic()
    with pytest.raises(Over):
        run_tool(py("import time; time.sleep(30)"), what="big", watch=watch, poll_s=0.01)
    assert time.monotonic() - t0 < 10 and len(set(pids)) == 1
    with pytest.raises(ProcessLookupError):
        os.kill(pids[0], 0)  # killed and reaped


# -- run_worker / worker_main -----------------------------------------------------------------------------
WORKER = '''
import os, signal, sys
from care.proc import report_progress, worker_main

def handle(job):
    mode = job["mode"]
    if mode == "sigill":
        print("error: about to run an AVX-512 kernel", flush=True)
        os.kill(os.getpid(), signal.SIGILL)
    if mode == "raise":
        raise ValueError("bad job " + repr(job["n"]))
    if mode == "noresult":
        print("leaving early", flush=True)
        os._exit(0)
    if mode == "exit":
        sys.exit(5)
    report_progress({"step": 1, "of": 2})
    print("a plain line")
    report_progress({"step": 2, "of": 2})
    return {"twice": job["n"] * 2}

if __name__ == "__main__":
    raise SystemExit(worker_main(handle))
'''


@pytest.fixture()
def worker_env(tmp_path) -> dict[str, str]:
    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "care_test_worker.py").write_text(WORKER, encoding="utf-8")
    root = str(Path(care.__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in [str(mods), root, os.environ.get("PYTHONPATH")] if p)
    return {**os.environ, "PYTHONPATH": path}


def test_run_worker_returns_the_result_and_forwards_progress(tmp_path, worker_env):
    progress: list[dict] = []
    lines: list[str] = []
    out = run_worker("care_test_worker", {"mode": "ok", "n": 21}, workdir=tmp_path / "w", env=worker_env,
                     on_progress=progress.append, on_line=lines.append)
    assert out == {"twice": 42}
    assert progress == [{"step": 1, "of": 2}, {"step": 2, "of": 2}]
    assert lines == ["a plain line"]
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["job.json", "result.json"]


def test_run_worker_child_exception_is_its_error_line(tmp_path, worker_env):
    with pytest.raises(WorkerError) as err:
        run_worker("care_test_worker", {"mode": "raise", "n": 7}, workdir=tmp_path, env=worker_env, what="probe")
    assert err.value.message == "probe failed: ValueError: bad job 7"
    assert err.value.returncode == 1 and err.value.result == {"error": "ValueError: bad job 7"}


def test_run_worker_child_killed_by_sigill(tmp_path, worker_env):
    with pytest.raises(WorkerError) as err:
        run_worker("care_test_worker", {"mode": "sigill", "n": 0}, workdir=tmp_path, env=worker_env, what="probe")
    assert err.value.signal == "SIGILL"
    assert err.value.message == "probe failed (killed by SIGILL): error: about to run an AVX-512 kernel"
    assert not (tmp_path / "result.json").exists()


def test_run_worker_child_that_leaves_no_result(tmp_path, worker_env):
    (tmp_path / "result.json").write_text('{"twice": 0}')  # a stale result from an earlier run is not read
    with pytest.raises(WorkerError) as err:
        run_worker("care_test_worker", {"mode": "noresult", "n": 0}, workdir=tmp_path, env=worker_env, what="probe")
    assert err.value.message == "probe exited 0 but left no result.json: leaving early"
    with pytest.raises(WorkerError) as err:
        run_worker("care_test_worker", {"mode": "exit", "n": 0}, workdir=tmp_path, env=worker_env, what="probe")
    assert err.value.returncode == 5 and err.value.message.startswith("probe failed (exit 5)")


def test_worker_main_in_process(tmp_path, capsys):
    job = tmp_path / "job.json"
    job.write_text('{"x": 2}')
    assert worker_main(lambda j: {"y": j["x"] + 1}, [str(job)]) == 0
    assert (tmp_path / "result.json").read_text().strip().replace("\n", "").replace(" ", "") == '{"y":3}'
    assert worker_main(lambda j: [j], [str(job)]) == 1  # a handler must return a dict
    assert "not a dict" in (tmp_path / "result.json").read_text()
    assert worker_main(lambda j: {}, []) == 2
    report_progress({"a": 1})
    assert capsys.readouterr().out == 'CARE-PROGRESS {"a": 1}\n'
