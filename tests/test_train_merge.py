"""Merge parity: merged logits match the adapter model's; reload vs dequantize against the trained NF4 model."""

from __future__ import annotations

import json

import pytest

from care.errors import InvalidModelError, VerificationError


def _train(tmp_path, base, no_quant: bool):
    from test_train_sft import _recipe

    from care.train.sft import train

    return train(_recipe(tmp_path, base), tmp_path / "run", no_quant=no_quant).adapter_dir


def _randomize_lora_b(adapter_dir, scale: float = 0.05) -> None:
    """Two tiny steps barely move LoRA B from zero; give it real weight so a wrong merge would show."""
    import torch
    from safetensors.torch import load_file, save_file

    path = adapter_dir / "adapter_model.safetensors"
    sd = load_file(str(path))
    g = torch.Generator().manual_seed(0)
    for k, v in sd.items():
        if "lora_B" in k:
            sd[k] = torch.randn(v.shape, generator=g) * scale
    save_file(sd, str(path))


@pytest.fixture(scope="module")
def qlora_adapter(tmp_path_factory, tiny_llama):
    adapter = _train(tmp_path_factory.mktemp("qlora"), tiny_llama, no_quant=False)
    _randomize_lora_b(adapter)
    return adapter


def test_merge_both_methods_verified_and_saved(tmp_path, qlora_adapter, tiny_llama):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from care.train.merge import merge_adapter

    report = merge_adapter(qlora_adapter, tmp_path / "merged", method="both")
    by = {c["method"]: c for c in report.candidates}
    for c in by.values():
        assert c["max_abs_diff"] < 1e-3 and c["top1_agreement"] == 1.0
    # Dequantizing the NF4 base reproduces the trained function more closely than reloading fp32 weights.
    assert by["dequantize"]["trained_max_abs_diff"] < by["reload"]["trained_max_abs_diff"]
    assert report.method == "dequantize"
    out = tmp_path / "merged"
    info = json.loads((out / "care_merge.json").read_text())
    assert info["recipe_hash"] and info["base_model"] == str(tiny_llama) and info["trained_quantized"]
    gen = json.loads((out / "generation_config.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(out))
    eos = gen["eos_token_id"]
    assert tok.convert_tokens_to_ids("<|im_end|>") in (eos if isinstance(eos, list) else [eos])
    assert "{% generation %}" not in tok.chat_template and "<|im_start|>" in tok.chat_template
    merged = AutoModelForCausalLM.from_pretrained(str(out))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama))
    assert not any("lora" in n for n, _ in merged.named_parameters())
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert (merged(ids).logits - base(ids).logits).abs().max() > 1e-2  # the adapter is in the weights


def test_plain_lora_reload_merge(tmp_path, tiny_phi3):
    from care.train.merge import merge_adapter

    adapter = _train(tmp_path, tiny_phi3, no_quant=True)
    _randomize_lora_b(adapter)
    report = merge_adapter(adapter, tmp_path / "m", method="dequantize")  # not quantized: falls back to reload
    assert report.method == "reload" and report.max_abs_diff < 1e-3 and report.top1_agreement == 1.0
    assert (tmp_path / "m" / "model.safetensors").is_file()


def test_merge_failures(tmp_path, qlora_adapter):
    from care.train.merge import merge_adapter

    with pytest.raises(InvalidModelError, match="Not a LoRA adapter"):
        merge_adapter(tmp_path, tmp_path / "x")
    with pytest.raises(VerificationError):
        merge_adapter(qlora_adapter, tmp_path / "y", tolerance=0.0)
    assert not (tmp_path / "y").exists()  # nothing half-written


# -- the weight-level check that judges 16-bit merges ------------------------------------------------------------

def _bf16_copy(src, dst):
    """The tiny model saved in bf16 (as Phi-3.5-mini ships), so a reload merge happens in bf16."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).to(torch.bfloat16).save_pretrained(str(dst))
    AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(dst))
    return dst


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_merged_weights_match_base_plus_update_and_catch_a_wrong_merge(tmp_path, tiny_llama, dtype):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from care.train.merge import check_merged_weights, lora_factors

    base = _bf16_copy(tiny_llama, tmp_path / "base") if dtype == "bfloat16" else tiny_llama

    def adapted():
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=getattr(torch, dtype))
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        g = torch.Generator().manual_seed(1)
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.data = (torch.randn(p.shape, generator=g) * 0.05).to(p.dtype)
        return peft_model

    peft_model = adapted()
    factors = lora_factors(peft_model)
    assert factors and all(k.startswith("model.layers.") for k in factors)
    merged = peft_model.merge_and_unload()
    ok = check_merged_weights(merged, str(base), factors, dtype)
    assert ok["checked"] == len(factors) and ok["max_ratio"] <= 1.0, ok
    assert ok["delta_to_rounding"] > 1.0  # the update is big enough for the check to see it

    # Twice the LoRA scale (an alpha/rsLoRA mix-up), a merge that skipped a module, and one corrupted matrix.
    doubled = {k: (a, b, 2 * s) for k, (a, b, s) in factors.items()}
    assert check_merged_weights(merged, str(base), doubled, dtype)["max_ratio"] > 1.0
    unmerged = adapted().unload()
    assert check_merged_weights(unmerged, str(base), factors, dtype)["max_ratio"] > 1.0
    key = next(iter(factors)) + ".weight"
    with torch.no_grad():
        dict(merged.named_parameters())[key].mul_(1.05)
    bad = check_merged_weights(merged, str(base), factors, dtype)
    assert bad["max_ratio"] > 1.0 and bad["worst"] == key


def test_weight_check_skips_without_a_local_checkpoint(tmp_path, tiny_llama):
    from care.train.merge import check_merged_weights

    out = check_merged_weights(None, str(tmp_path / "nowhere"), {}, "bfloat16")
    assert out["checked"] == 0 and "no local safetensors" in out["skipped"]
