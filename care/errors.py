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


def require(module: str, extra: str) -> None:
    """Raise DependencyMissingError naming the extra to install if `module` cannot be imported."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise DependencyMissingError(
            f"Python package '{module}' is not installed",
            hint=f"Install it with: pip install 'care[{extra}]' (or run `make setup` in the checkout)",
        )
