"""llama.cpp's HF -> GGUF converter, version-matched to the installed llama-cpp-python (`care export setup`).

The llama-cpp-python sdist of the *installed* version ships the matching `vendor/llama.cpp/convert_hf_to_gguf.py`,
`convert_lora_to_gguf.py`, `conversion/` and `gguf-py/`. The sdist comes from the same cached `fetch_sdist` the
wheel and tool builds use (one download per version), and only those files are extracted into
`care.paths.data_dir()/llama.cpp-<version>/` ($CARE_CONVERTER_DIR overrides). care.export runs the scripts in a
subprocess with that `gguf-py` first on the path, so the PyPI `gguf` that transformers needs is never touched.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

from care.errors import ExportError, ModelNotFoundError
from care.toolchain.llamacpp.source import SDIST_ENV, BuildError, fetch_sdist

log = logging.getLogger(__name__)

# models/ggml-vocab-phi-3.gguf: llama.cpp's vocab-only GGUF of the Phi-3 tokenizer (0.7 MB), so a
# Phi-3.5-shaped benchmark model (bench/phone_profile.py) has the real 32,064-token vocabulary offline.
PHI3_VOCAB = "models/ggml-vocab-phi-3.gguf"
HF_SCRIPT = "convert_hf_to_gguf.py"  # `care export gguf`
LORA_SCRIPT = "convert_lora_to_gguf.py"  # `care export gguf-lora`
EXTRACTED = (HF_SCRIPT, LORA_SCRIPT, "conversion/", "gguf-py/gguf/", "gguf-py/LICENSE", "LICENSE", PHI3_VOCAB)
COMPLETE = ".care-complete"


def llama_cpp_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError as exc:
        raise ExportError(
            "llama-cpp-python is not installed", hint="Install it with: pip install 'care[runtime]'"
        ) from exc


def converter_dir(version: str | None = None) -> Path:
    """Where the converter for `version` lives: $CARE_CONVERTER_DIR (tests share one across their per-test
    user folders), else the user data folder."""
    env = os.environ.get("CARE_CONVERTER_DIR")
    if env:
        return Path(env).expanduser()
    from care.paths import data_dir

    return data_dir() / f"llama.cpp-{version or llama_cpp_version()}"


def find_converter(version: str | None = None) -> Path | None:
    """The extracted converter folder if a complete one for this llama-cpp-python version is there."""
    version = version or llama_cpp_version()
    folder = converter_dir(version)
    try:
        marker = json.loads((folder / COMPLETE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = marker.get("version") == version and all((folder / f).is_file() for f in (HF_SCRIPT, LORA_SCRIPT))
    return folder if ok and (folder / "gguf-py" / "gguf" / "__init__.py").is_file() else None


def phi3_vocab() -> Path:
    """llama.cpp's Phi-3 vocabulary GGUF from the converter folder (`care export setup` extracts it)."""
    folder = find_converter()
    path = (folder or converter_dir()) / PHI3_VOCAB
    if not path.is_file():
        raise ModelNotFoundError("llama.cpp's Phi-3 vocabulary is not in the converter folder", path=path,
                                 hint="Run `care export setup --force` to extract it from the llama-cpp-python sdist")
    return path


def extract_converter(sdist: Path, target: Path, version: str) -> None:
    """Copy only the converter files out of the sdist into `target`, atomically (temp dir + rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        n = 0
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                parts = member.name.split("/", 3)
                if len(parts) < 4 or parts[1:3] != ["vendor", "llama.cpp"] or not member.isfile():
                    continue
                rel = parts[3]
                if not rel.startswith(EXTRACTED) or ".." in rel.split("/"):
                    continue
                dest = tmp / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(member)
                if src is None:
                    continue
                with src, dest.open("wb") as fh:
                    shutil.copyfileobj(src, fh)
                n += 1
        if not (tmp / HF_SCRIPT).is_file() or not (tmp / "gguf-py" / "gguf").is_dir():
            raise ExportError("The llama-cpp-python sdist has no vendor/llama.cpp/convert_hf_to_gguf.py",
                              path=sdist, hint="Pass the sdist of a llama-cpp-python >= 0.3 release")
        (tmp / COMPLETE).write_text(json.dumps({"sdist": sdist.name, "files": n, "version": version}) + "\n")
        shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / COMPLETE).is_file():  # else another process just finished the same setup
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def setup_converter(force: bool = False, sdist: str | os.PathLike[str] | None = None) -> Path:
    """Fetch llama.cpp's converter matching the installed llama-cpp-python; return its folder.

    `sdist` (or $CARE_LLAMA_CPP_SDIST) points at a local llama_cpp_python-<version>.tar.gz for offline use;
    otherwise the cached sdist of the llama.cpp builds is used, downloaded with pip (and cached) when absent.
    """
    version = llama_cpp_version()
    found = find_converter(version)
    if found and not force:
        return found
    target = converter_dir(version)
    if sdist:
        path = Path(sdist).expanduser()
        if not path.is_file():
            raise ModelNotFoundError("llama-cpp-python sdist not found", path=path)
        if f"-{version}." not in path.name:
            raise ExportError(f"The sdist is not llama-cpp-python {version}, the installed version", path=path,
                              hint=f"Pass llama_cpp_python-{version}.tar.gz so the converter matches libllama")
    else:
        try:
            path = fetch_sdist(version)
        except BuildError as exc:  # the one line names this command, not the build it shares the download with
            raise ExportError(exc.message, path=exc.path, hint="Connect to PyPI once and run `care export setup`, "
                              f"or set {SDIST_ENV} to a local llama_cpp_python-{version}.tar.gz") from exc
    extract_converter(path, target, version)
    log.info("llama.cpp converter ready in %s", target)
    return target
