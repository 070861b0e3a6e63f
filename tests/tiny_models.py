"""Tiny random models built in code, with the real SmolLM2 tokenizer, so the suite stays fast.

- tiny Llama (SmolLM2's architecture: separate q/k/v and gate/up projections);
- tiny Phi-3 with the real fused `qkv_proj` / `gate_up_proj` layout.

The tokenizer is read from the embedded SmolLM2 GGUF with transformers' `gguf_file=` once and cached
under .cache/tests (keyed by the GGUF's size and mtime), since that read takes ~10-20 s.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("CARE_TEST_CACHE", REPO / ".cache" / "tests"))


def _key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha1(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]


def smollm_tokenizer_dir() -> Path:
    """A folder holding SmolLM2's tokenizer (tokenizer.json + config + chat template)."""
    from care.models import embedded_gguf

    gguf_path = embedded_gguf()
    out = CACHE / f"smollm2-tokenizer-{_key(gguf_path)}"
    if (out / "tokenizer_config.json").is_file():
        return out
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _save(model, tokenizer_dir: Path, out: Path) -> Path:
    from transformers import AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def build_tiny_llama(out: Path, tokenizer_dir: Path | None = None, seed: int = 0, hidden: int = 64) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer_dir = tokenizer_dir or smollm_tokenizer_dir()
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(cfg).eval()
    return _save(model, tokenizer_dir, out)


def build_tiny_phi3(out: Path, tokenizer_dir: Path | None = None, seed: int = 0, hidden: int = 64) -> Path:
    """Phi-3 keeps q/k/v in one `qkv_proj` and gate/up in one `gate_up_proj`, like Phi-3.5-mini."""
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    tokenizer_dir = tokenizer_dir or smollm_tokenizer_dir()
    torch.manual_seed(seed)
    cfg = Phi3Config(
        vocab_size=49152,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        original_max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    model = Phi3ForCausalLM(cfg).eval()
    names = {n for n, _ in model.named_modules()}
    assert any(n.endswith("qkv_proj") for n in names) and any(n.endswith("gate_up_proj") for n in names)
    return _save(model, tokenizer_dir, out)


def make_adapter(base_dir: Path, out: Path, *, targets: list[str], r: int = 8, alpha: float = 16.0,
                 rslora: bool = False, b_std: float = 0.05, seed: int = 0, care_info: dict | None = None,
                 **extra) -> Path:
    """A peft LoRA adapter on `base_dir` with random non-zero B (peft initialises B to zero: a no-op)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    cfg = LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=targets, lora_dropout=0.0,
                     task_type="CAUSAL_LM", **extra)
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, b_std)
    peft_model.save_pretrained(str(out))
    if care_info is not None:
        (out / "care_adapter.json").write_text(json.dumps(care_info))
    return out
