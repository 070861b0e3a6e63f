"""Run on the CPU it finds: pick a ggml CPU module that is proven to run here before llama.cpp loads.

The portable wheel carries one ggml CPU module per CPU family (libggml-cpu-haswell.so, -icelake.so,
-sapphirerapids.so, ...) and ggml loads the one with the best score for this CPU's features. A feature list
says what a CPU has, not that a module's kernels run correctly on it: issue 22's AMX module died with SIGILL
on a Sapphire Rapids-class Xeon (root cause and fix: care/toolchain/llamacpp/patches.py). So before the first llama.cpp
load on a machine:

1. The modules are scored as ggml scores them (each one's ggml_backend_score(), from CPUID).
2. The best one runs a short prefill and decode of a tiny model in every quant type the project ships, in a
   child process (care/runtime/cpu_probe.py, a care.proc worker; ~1 s). If the child dies (SIGILL, SIGSEGV)
   or computes garbage, that module is refused and the next best is tried.
3. A refused module is left out the way ggml allows: a folder of links to every library but the refused
   ones, handed to llama-cpp-python as $LLAMA_CPP_LIB_PATH (child processes inherit it), so ggml's own
   choice among the rest is the module the next probe proved. The choice is cached by CPU flags, kernel,
   Python and the wheel's files (name, size, mtime); a cached choice also needs its module's score (CPUID)
   to be unchanged, which tells an emulated CPU (qemu-user shows the host's /proc/cpuinfo) from the host. A refusal is logged once as a warning, and
   `care doctor` names the module in use and the one refused.

Every process that loads llama.cpp goes through care.runtime.llama_compat.load(), which calls ensure().
`python -m care.runtime.cpu_guard` runs the check and prints one line (the clinic bundle's install.sh does).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from care.errors import CareError, WorkerError
from care.proc import run_worker

log = logging.getLogger(__name__)

LIB_ENV = "LLAMA_CPP_LIB_PATH"  # llama-cpp-python's own override of its library folder
DONE_ENV = "CARE_CPU_GUARD_LIB"  # set by ensure(): the folder already checked (children skip the check)
CACHE_ENV = "CARE_CPU_GUARD_CACHE"
GUARD_REV = 3  # bump when the probe changes what it checks (2: real logits, logits_all; 3: AMX distrusted)
# ggml's AMX module (sapphirerapids), with the first tile-config patch (care/toolchain/llamacpp/patches.py, 2), was
# measured here (Xeon with AMX, 2026-12-03) to give wrong greedy tokens on SmolLM2 Q4_K_M ("L'Étoile, la Mar"
# where HF and every other module say "The capital of") and one SIGILL in decode during the full suite, cases
# the short probe passes. The likely cause (another AMX user on the thread replacing or releasing the tile
# config) is patched (patches.py, 3), shown right in emulation only: no AMX machine has run it. So the module stays
# refused by policy: AVX-512 (zen4/icelake) runs instead. CARE_CPU_ALLOW_AMX=1 lets the probe decide again
# (bench/cpu_modules.py, to measure it on a Xeon).
DISTRUSTED = {"sapphirerapids": "distrusted: wrong tokens and SIGILL measured on AMX before the config-reload patch, "
                                "not re-measured on AMX since (set CARE_CPU_ALLOW_AMX=1 to probe it)"}
ALLOW_AMX_ENV = "CARE_CPU_ALLOW_AMX"
PROBE_TIMEOUT = 120


class CpuUnsupportedError(CareError):
    """No llama.cpp CPU module of this installation runs correctly on this CPU."""


@dataclass
class Choice:
    variant: str | None  # the module's file name; None: a build with one CPU library (nothing to choose)
    lib: str = ""  # the folder llama-cpp-python loads from: the package's lib/, or links without the refused
    refused: list[dict[str, str]] = field(default_factory=list)  # [{"variant", "why"}], best first
    scores: dict[str, int] = field(default_factory=dict)
    gaps: dict[str, float] = field(default_factory=dict)  # batch vs one-token logits, per quant type
    seconds: float = 0.0
    cached: bool = False
    key: str = ""

    @property
    def name(self) -> str:
        return variant_name(self.variant) if self.variant else "built-in"


def variant_name(file_name: str) -> str:
    return file_name.removeprefix("libggml-cpu-").split(".so")[0]


def lib_dir() -> Path | None:
    """Where llama-cpp-python will load its libraries from ($LLAMA_CPP_LIB_PATH, else the package's lib/)."""
    env = os.environ.get(LIB_ENV)
    if env:
        return Path(env)
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "lib"


def cpu_identity() -> dict[str, str]:
    """What the choice depends on: the CPU's feature flags and model, the kernel (it grants AMX/AVX state)."""
    flags = model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key in ("flags", "features") and not flags:
                flags = " ".join(sorted(value.split()))
            elif key in ("model name", "cpu part") and not model:
                model = value.strip()
    except OSError:
        model = platform.processor()
    return {"machine": platform.machine(), "kernel": platform.release(), "model": model, "flags": flags}


def _fingerprint(lib: Path) -> list[list[object]]:
    rows = []
    for path in sorted(lib.glob("lib*.so*")):
        st = path.stat()
        rows.append([path.name, st.st_size, st.st_mtime_ns])
    return rows


def cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    from care.paths import cache_dir as user_cache

    return user_cache() / "cpu-guard"


def cache_key(lib: Path) -> str:
    blob = json.dumps({"cpu": cpu_identity(), "lib": str(lib.resolve()), "files": _fingerprint(lib),
                       "python": sys.version.split()[0], "rev": GUARD_REV,
                       "allow_amx": bool(os.environ.get(ALLOW_AMX_ENV))}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _child(job: dict[str, Any], env: dict[str, str], timeout: float = PROBE_TIMEOUT
           ) -> tuple[dict[str, Any], dict[str, Any], str | None]:
    """Run one care.runtime.cpu_probe job in a child (care.proc.run_worker): (its result or {}, its last
    progress {"loaded": module, "probe": type}, why it failed or None)."""
    seen: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="care-cpu-probe-") as work:
        try:
            out = run_worker("care.runtime.cpu_probe", job, workdir=Path(work), env=env, timeout=timeout,
                             on_progress=seen.update, what="the CPU probe")
        except WorkerError as exc:
            if exc.signal:
                why = f"died with {exc.signal}"
            elif exc.timed_out:
                why = f"timed out after {timeout:.0f} s"
            else:
                why = exc.detail or f"exited {exc.returncode}"
            return {}, seen, why
    return out, seen, None


def _models(lib: Path, env: dict[str, str]) -> Path:
    """The tiny probe models (built once per llama.cpp build, quantised by its own libllama: no ggml compute
    runs while quantising, so any module that loads will do)."""
    folder = cache_dir() / f"models-{hashlib.sha256(json.dumps(_fingerprint(lib)).encode()).hexdigest()[:12]}"
    from care.runtime.cpu_probe import TYPES

    if all((folder / f"probe-{t}.gguf").is_file() for t in TYPES):
        return folder
    _, _, why = _child({"what": "models", "out": str(folder)}, env)
    if why is not None:
        raise CpuUnsupportedError(f"Could not build the CPU probe models: {why}", path=folder,
                                  hint="Reinstall llama-cpp-python with `make setup`, or report this CPU")
    return folder


def without(lib: Path, refused: list[str]) -> Path:
    """A folder of links to every file of `lib` but the `refused` modules (made once, atomically)."""
    if not refused:
        return lib
    tag = hashlib.sha256(json.dumps([str(lib.resolve()), sorted(refused)]).encode()).hexdigest()[:12]
    folder = cache_dir() / f"lib-{tag}"
    if folder.is_dir():
        return folder
    import tempfile

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    for path in lib.iterdir():
        if path.name not in refused:
            (tmp / path.name).symlink_to(path.resolve())
    try:
        os.replace(tmp, folder)
    except OSError:  # another process made it first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def choose(lib: Path | None = None, *, use_cache: bool = True) -> Choice:
    """The CPU module to load on this machine (cached); raises CpuUnsupportedError when none runs."""
    lib = lib or lib_dir()
    if lib is None or not lib.is_dir():
        return Choice(None)
    from care.runtime.cpu_probe import scores as score_modules

    key = cache_key(lib)
    cache = cache_dir() / f"{key}.json"
    if use_cache:
        try:
            choice = Choice(**{**json.loads(cache.read_text(encoding="utf-8")), "cached": True})
        except (OSError, ValueError, TypeError):
            pass
        else:
            # The chosen module's own score, from CPUID, must be what it was: under qemu-user /proc/cpuinfo is the
            # host's, so the key alone would hand an emulated older CPU the host's module.
            same_cpu = choice.variant is None or score_modules(lib, [choice.variant]) == {
                choice.variant: choice.scores.get(choice.variant)}
            if same_cpu:
                if choice.lib and not Path(choice.lib).is_dir():  # the links were cleaned away: make them again
                    choice.lib = str(without(lib, [f"libggml-cpu-{r['variant']}.so" for r in choice.refused]))
                return choice
    scores = score_modules(lib)
    t0 = time.monotonic()
    env = {k: v for k, v in os.environ.items() if k != DONE_ENV}
    variants = sorted(scores)
    ranked = sorted((v for v in variants if scores.get(v, 0) > 0), key=lambda v: -scores[v])
    if variants and not ranked:
        raise CpuUnsupportedError("No llama.cpp CPU module of this build supports this CPU", path=lib,
                                  hint="The portable wheel needs x86-64 with SSE4.2 or ARMv8.2; see docs/bundle.md")
    # Quantising runs no ggml compute, but importing llama_cpp initialises the best module: load the lowest.
    models = _models(lib, {**env, LIB_ENV: str(without(lib, ranked[:-1]))})
    refused: list[dict[str, str]] = []
    left_out: list[str] = [v for v in variants if v not in ranked]  # score 0: ggml never picks them anyway
    if not os.environ.get(ALLOW_AMX_ENV):
        for v in ranked:
            if variant_name(v) in DISTRUSTED:
                refused.append({"variant": variant_name(v), "why": DISTRUSTED[variant_name(v)]})
                left_out.append(v)
    for expected in ranked or [None]:
        folder = without(lib, [v for v in left_out if v in ranked])
        out, seen, died = _child({"what": "run", "models": str(models)}, {**env, LIB_ENV: str(folder)})
        loaded = out.get("module") or seen.get("loaded") or expected
        if died is None and out.get("ok"):
            choice = Choice(loaded, str(folder), refused, scores, dict(out.get("gaps", {})),
                            round(time.monotonic() - t0, 3), False, key)
            _save(cache, choice)
            return choice
        typ = out.get("type") or seen.get("probe") or ""
        why = out.get("why") or died or "failed"
        refused.append({"variant": variant_name(loaded) if loaded else "built-in",
                        "why": f"{why} in the {typ} check" if typ else why})
        if loaded is None:
            break
        left_out.append(loaded)
    names = ", ".join(f"{r['variant']} ({r['why']})" for r in refused)
    raise CpuUnsupportedError(f"No llama.cpp CPU module runs on this CPU: {names}", path=lib,
                              hint="Report the CPU (care doctor); a build with GGML_NATIVE=OFF for an older family "
                                   "may work")


def _save(cache: Path, choice: Choice) -> None:
    from care.io import write_text

    data = {k: v for k, v in asdict(choice).items() if k != "cached"}
    try:
        write_text(cache, json.dumps(data, indent=2) + "\n")
    except OSError as exc:  # a read-only cache costs a probe per process, never the chat
        log.info("CPU guard: cannot cache the choice (%s)", exc)


_ENSURED: Choice | None = None


def ensure() -> Choice:
    """Choose (once per process) the CPU module for llama-cpp-python and point it at it; logs a refusal."""
    global _ENSURED
    if _ENSURED is not None:
        return _ENSURED
    if "llama_cpp" in sys.modules:
        log.warning("llama_cpp was imported before the CPU guard ran: its CPU module was not checked")
        _ENSURED = Choice(None)
        return _ENSURED
    lib = lib_dir()
    if lib is not None and os.environ.get(DONE_ENV) == str(lib):  # a parent process checked this folder
        _ENSURED = Choice(None, str(lib), cached=True)
        return _ENSURED
    choice = choose(lib)
    if choice.lib and lib is not None and choice.lib != str(lib):
        os.environ[LIB_ENV] = choice.lib
    if choice.lib:
        os.environ[DONE_ENV] = choice.lib
    if choice.refused and not choice.cached:
        log.warning("llama.cpp CPU module %s refused on this CPU; using %s",
                    "; ".join(f"{r['variant']} ({r['why']})" for r in choice.refused), choice.name)
    elif not choice.cached:
        log.info("llama.cpp CPU module %s checked in %.1f s", choice.name, choice.seconds)
    _ENSURED = choice
    return choice


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m care.runtime.cpu_guard", description=__doc__.split("\n")[0])
    ap.add_argument("--recheck", action="store_true", help="ignore the cached choice")
    ap.add_argument("--json", action="store_true")
    opts = ap.parse_args(argv)
    try:
        choice = choose(use_cache=not opts.recheck)
    except CareError as exc:
        sys.stderr.write(f"Error: {exc.one_line()}\n")
        return 2
    if opts.json:
        sys.stdout.write(json.dumps(asdict(choice), indent=2) + "\n")
    else:
        refused = "; ".join(f"{r['variant']} refused: {r['why']}" for r in choice.refused)
        sys.stdout.write(f"llama.cpp CPU module: {choice.name}" + (f" ({refused})" if refused else "") + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
