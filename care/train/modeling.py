"""Base models for training and merging: where they come from, how they load (4-bit or not), LoRA targets."""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path
from typing import Any

from care.errors import ConfigError, ModelNotFoundError, TrainingError

log = logging.getLogger(__name__)

EMBEDDED = "embedded"


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def precision(name: str | None = "auto"):
    """The resolved training precision on this machine's training device (rule: care/train/precision.py)."""
    from care.train.precision import resolve_precision, training_device

    return resolve_precision(training_device(), name)


def compute_dtype(name: str | None = "auto"):
    """The torch dtype for quant.compute_dtype `name` on this machine: auto = bf16 only on GPUs with bf16 units
    (capability >= 8.0, MI200/MI300), fp16 on older GPUs, fp32 on CPU (see care/train/precision.py)."""
    from care.train.precision import torch_dtype

    return torch_dtype(precision(name).compute)


def _gguf_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha1(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]


def gguf_to_folder(gguf_path: Path) -> Path:
    """Dequantize a GGUF into a cached HF folder once (transformers' gguf_file= loader takes ~20 s a time and
    cannot be combined with 4-bit loading); later loads read the safetensors directly."""
    from care.io import check_free_space
    from care.paths import cache_dir

    out = cache_dir() / "models" / f"{gguf_path.stem}-{_gguf_key(gguf_path)}"
    if (out / "config.json").is_file() and (out / ".complete").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_free_space(out.parent, gguf_path.stat().st_size * 8, "dequantized base model")
    log.info("dequantizing %s into %s (once)", gguf_path, out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds for a bad GGUF
        raise ModelNotFoundError(f"Could not load the GGUF with transformers: {exc}", path=gguf_path,
                                 hint="Pass a HF model folder as model.base instead") from exc
    # The GGUF loader dequantizes every tensor but leaves a "gguf" quantizer marker that blocks saving.
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    if model.generation_config.eos_token_id is None:
        model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / ".complete").write_text(str(gguf_path) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def resolve_base(model_cfg: dict[str, Any], resolve=lambda p: Path(p)) -> str:
    """The base model as something from_pretrained accepts: a local folder (GGUFs dequantized) or a hub id."""
    base = str(model_cfg.get("base") or EMBEDDED)
    gguf_file = model_cfg.get("gguf_file")
    if base in (EMBEDDED, "default", "smollm2-135m"):
        from care.models import embedded_gguf

        return str(gguf_to_folder(embedded_gguf()))
    path = resolve(base)
    if gguf_file:
        g = (path / gguf_file) if path.is_dir() else resolve(gguf_file)
        if not g.is_file():
            raise ModelNotFoundError("GGUF file not found", path=g, hint="Check model.gguf_file in the recipe")
        return str(gguf_to_folder(g))
    if path.suffix == ".gguf" and path.is_file():
        return str(gguf_to_folder(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError("Model folder has no config.json", path=path,
                                     hint="Point model.base at a Hugging Face model folder")
        return str(path.resolve())
    if path.exists() or base.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"Base model '{base}' not found", path=path,
                                 hint="Use a local HF folder, a .gguf, `embedded`, or a hub id when online")
    return base  # a hub id: from_pretrained fails with its own message when offline and not cached


def load_tokenizer(base: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(base)
    except OSError as exc:
        raise ModelNotFoundError(f"Could not load the tokenizer of '{base}': {exc}",
                                 hint="Use a local model folder (HF_HUB_OFFLINE=1 blocks the hub)") from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def bnb_config(quant_cfg: dict[str, Any]):
    from transformers import BitsAndBytesConfig

    from care.train.distributed import sharding

    dtype = compute_dtype(quant_cfg.get("compute_dtype", "auto"))
    extra = {}
    if sharding():  # FSDP/ZeRO-3 shard flat tensors of one dtype: the packed 4-bit weights must share it
        extra["bnb_4bit_quant_storage"] = dtype
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_cfg.get("quant_type", "nf4"),
        bnb_4bit_use_double_quant=bool(quant_cfg.get("double_quant", True)),
        bnb_4bit_compute_dtype=dtype,
        **extra,
    )


def load_model(base: str, quant_cfg: dict[str, Any] | None, quantize: bool, dtype=None):
    """The base model on this machine's device: NF4 (QLoRA) when `quantize`, else in `dtype` (default: the
    compute dtype)."""
    from transformers import AutoModelForCausalLM

    from care.train.distributed import local_rank, sharding
    from care.train.lowmem import from_pretrained

    quant_cfg = quant_cfg or {}
    kwargs: dict[str, Any] = {"dtype": dtype or compute_dtype(quant_cfg.get("compute_dtype", "auto"))}
    if quantize:
        from care.errors import require

        require("bitsandbytes", "train")
        kwargs["quantization_config"] = bnb_config(quant_cfg)
        # Each DDP process loads onto its own GPU; FSDP/ZeRO-3 place the shards themselves (no device map).
        if not sharding():
            kwargs["device_map"] = {"": device() if device() == "cpu" else local_rank()}
    try:  # FSDP/ZeRO-3 have their own loading (rank 0 reads, the others build on meta): leave it to them
        model = (AutoModelForCausalLM.from_pretrained if sharding() else from_pretrained)(base, **kwargs)
    except OSError as exc:
        raise ModelNotFoundError(f"Could not load base model '{base}': {exc}",
                                 hint="Use a local model folder (HF_HUB_OFFLINE=1 blocks the hub)") from exc
    except (RuntimeError, ValueError) as exc:
        raise TrainingError(f"Could not load base model '{base}' ({'4-bit' if quantize else 'full'}): {exc}",
                            hint="Try --no-quant for plain LoRA") from exc
    if not quantize and device() == "cuda":
        model = model.to(f"cuda:{local_rank()}")
    return model


def linear_layer_names(model) -> list[str]:
    """Short names of every Linear layer (4-bit ones included) except the output head."""
    import torch

    out_emb = model.get_output_embeddings()
    names: set[str] = set()
    for full, module in model.named_modules():
        if module is out_emb or full.endswith("lm_head"):
            continue
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            names.add(full.rsplit(".", 1)[-1])
    return sorted(names)


def resolve_target_modules(model, spec: str | list[str] | None) -> list[str]:
    """LoRA target modules for this architecture. `all-linear` = every Linear except the head: Llama/Mistral
    give q/k/v/o_proj + gate/up/down_proj; Phi-3 fuses them into qkv_proj and gate_up_proj."""
    available = linear_layer_names(model)
    if spec in (None, "all-linear", "all_linear"):
        return available
    wanted = [spec] if isinstance(spec, str) else list(spec)
    missing = [w for w in wanted if w not in available]
    if missing:
        raise ConfigError(f"LoRA target modules {missing} are not in this model",
                          hint=f"This architecture has: {', '.join(available)} (or use all-linear)")
    return wanted
