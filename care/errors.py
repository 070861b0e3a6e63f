"""Typed errors. Library code raises these; only the CLI edge turns them into one-line messages.

Every error carries a `hint` telling the user how to fix it, so the CLI can print
"Error: <what> (<file>). <fix>" on one line.
"""

from __future__ import annotations


class CareError(Exception):
    """Base class of every error CARE Edge raises on purpose."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None, path: object | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.path = str(path) if path is not None else None

    def one_line(self) -> str:
        parts = [self.message]
        if self.path and self.path not in self.message:
            parts[0] += f" ({self.path})"
        if self.hint:
            parts.append(self.hint)
        return " ".join(p.strip().rstrip(".") + "." for p in parts).replace("\n", " ")


class ConfigError(CareError):
    """A recipe, option or setting is invalid."""


class UsageError(CareError):
    """The command line itself is wrong (unknown command, bad option combination)."""


class DependencyMissingError(CareError):
    """An optional dependency (extra) is not installed."""


class ModelNotFoundError(CareError):
    """A model name or path does not resolve to a file or folder."""


class InvalidModelError(CareError):
    """A model file/folder exists but is not usable (truncated GGUF, adapter instead of merged model, ...)."""


class DataError(CareError):
    """A data file is missing, malformed or has bad rows under --strict."""


class TrainingError(CareError):
    """Training could not start or continue."""


class ExportError(CareError):
    """Conversion or quantization failed."""


class VerificationError(CareError):
    """An exported or merged model does not match its source within tolerance."""


class GenerationError(CareError):
    """The runtime could not generate (context overflow, template missing, ...)."""


class EvalError(CareError):
    """A benchmark or metric could not run."""


class DiskFullError(CareError):
    """Not enough free disk space for an output."""


class ToolError(CareError):
    """An external program (a llama.cpp tool, a converter, a build step) could not start, exited non-zero,
    died by a signal or ran past its time limit (care.proc.run_tool).

    `what` names the program, `returncode` is its exit status (negative: -signal number; None: it never
    ran), `signal` the signal's name ("SIGILL") when one killed it, `lines` the tail of its output and
    `detail` the line of it worth showing (care.proc.error_line)."""

    def __init__(self, message: str, *, what: str, returncode: int | None = None, signal: str | None = None,
                 lines: list[str] | None = None, detail: str | None = None, timed_out: bool = False,
                 hint: str | None = None, path: object | None = None) -> None:
        super().__init__(message, hint=hint, path=path)
        self.what = what
        self.returncode = returncode
        self.signal = signal
        self.lines = list(lines or [])
        self.detail = detail
        self.timed_out = timed_out


class WorkerError(ToolError):
    """A child worker (care.proc.run_worker) died by a signal, exited non-zero, timed out, reported an error
    or left no result file. `result` is what it wrote, if anything (e.g. {"error": "..."})."""

    def __init__(self, message: str, *, result: dict | None = None, **kwargs: object) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.result = result


def require(module: str, extra: str) -> None:
    """Raise DependencyMissingError naming the extra to install if `module` cannot be imported."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise DependencyMissingError(
            f"Python package '{module}' is not installed",
            hint=f"Install it with: pip install 'care[{extra}]' (or run `make setup` in the checkout)",
        )
