"""`care export gguf-lora` on tiny random models: llama.cpp's LoRA converter, the rsLoRA scale, base+adapter in
llama.cpp vs the peft-merged model, the rejection errors, base resolution and the manifest/Modelfile."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
from tiny_models import make_adapter

from care.errors import ExportError, ModelNotFoundError, VerificationError
from care.export.gguf import export_gguf
from care.export.lora import export_gguf_lora, read_lora_gguf
from care.export.lora_source import inspect_adapter
from care.runtime import llama_compat

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PHI3_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


@pytest.fixture(scope="module")
def llama_f16(tmp_path_factory, tiny_llama) -> Path:
    """The tiny Llama base as an f16 GGUF: base + adapter must then match the merged model near-exactly."""
    out = tmp_path_factory.mktemp("base-f16")
    return export_gguf(tiny_llama, out, quants=("f16",), verify=False).files["f16"]


@pytest.fixture(scope="module")
def llama_lora_export(tmp_path_factory, tiny_llama, llama_f16):
    root = tmp_path_factory.mktemp("lora")
    adapter = make_adapter(tiny_llama, root / "adapter", targets=LLAMA_TARGETS, r=8, alpha=16,
                           care_info={"base_model": str(tiny_llama), "recipe_name": "tiny-banking"})
    out = root / "out"
    result = export_gguf_lora(adapter, out, verify_base=llama_f16, n_threads=1, verify_kwargs={"max_tokens": 64})
    return adapter, out, result


@pytest.mark.slow
def test_llama_adapter_in_llama_cpp_matches_the_merged_model(llama_lora_export):
    _, out, result = llama_lora_export
    report = result.verify_report
    assert report["passed"] and report["quant"] == "f16"
    got = report["files"]["base+adapter"]
    assert got["top1_agreement"] >= 0.98 and got["kl_max"] < 2e-3
    # The adapter really moved the output, far beyond the f16 rounding that remains against the merged model.
    assert report["adapter_effect_kl"] > 100 * max(got["kl_mean"], 1e-7)
    assert report["base_alone_kl"] > 100 * max(got["kl_mean"], 1e-7)
    # The merged f16 export of the same fine-tune is reported beside it, and is just as close.
    assert report["files"]["merged"]["top1_agreement"] >= 0.98
    assert json.loads((out / "verify.json").read_text())["adapter_effect_kl"] == pytest.approx(
        report["adapter_effect_kl"])


@pytest.mark.slow
def test_verified_manifest_and_no_local_paths(llama_lora_export, llama_f16, tiny_llama):
    adapter, out, result = llama_lora_export
    manifest = json.loads(result.manifest_path.read_text())
    a = manifest["adapter"]
    assert a["file"] == result.adapter.name == "tiny-banking-lora-f16.gguf"
    assert a["size"] == result.adapter.stat().st_size
    assert a["sha256"] == hashlib.sha256(result.adapter.read_bytes()).hexdigest()
    assert manifest["lora"] == {"rank": 8, "alpha": 16.0, "rslora": False, "scale": 2.0, "stored_alpha": 16.0,
                                "target_modules": sorted(LLAMA_TARGETS)}
    on = manifest["base"]["verified_on"]
    assert on["file"] == llama_f16.name and on["sha256"] == hashlib.sha256(llama_f16.read_bytes()).hexdigest()
    assert manifest["verified"] is True and manifest["base"]["model"] == tiny_llama.name
    # Nothing of this machine's folders in what ships: manifest, verify.json, GGUF metadata.
    for text in (result.manifest_path.read_text(), (out / "verify.json").read_text()):
        assert str(adapter.parent) not in text and str(tiny_llama) not in text
    meta = read_lora_gguf(result.adapter)
    assert meta["adapter_type"] == "lora" and meta["name"] == "tiny-banking"
    strings = [v for v in meta["kv"].values() if isinstance(v, str)]
    assert strings and not [v for v in strings if v.startswith("/")]
    assert meta["kv"]["care.source.base_model"] == tiny_llama.name
    # Ollama: FROM the base, ADAPTER ours, with the chat format and stops of a merged export.
    text = result.modelfile_path.read_text()
    assert "FROM ./" in text and f"ADAPTER ./{result.adapter.name}" in text
    assert 'PARAMETER stop "<|im_end|>"' in text and "<|im_start|>{{ .Role }}" in text
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files or staging left


def _llama_cpp_logits(base_gguf: Path, adapter_gguf: Path | None, ids: list[int]):
    llama_cpp = llama_compat.load()
    import numpy as np

    llm = llama_cpp.Llama(model_path=str(base_gguf), lora_path=str(adapter_gguf) if adapter_gguf else None,
                          n_ctx=128, n_batch=128, n_threads=1, logits_all=True, verbose=False)
    try:
        llm.eval(ids)
        return np.asarray(llm.scores[: len(ids)], dtype=np.float64)
    finally:
        llm.close()


def _merged_logits(base_dir: Path, adapter: Path, ids: list[int], scale_factor: float = 1.0):
    """peft's merged model (merge_and_unload) logits; `scale_factor` rescales the adapter (a wrong scale)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32),
                                      str(adapter))
    for module in model.modules():
        if hasattr(module, "scaling") and isinstance(module.scaling, dict):
            module.scaling = {k: v * scale_factor for k, v in module.scaling.items()}
    merged = model.merge_and_unload().eval()
    with torch.no_grad():
        return merged(torch.tensor([ids])).logits[0].double().numpy()


def _log_softmax(x):
    import numpy as np

    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _kl(p_logits, q_logits) -> float:
    import numpy as np

    lp, lq = _log_softmax(p_logits), _log_softmax(q_logits)
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


IDS = [1, *range(200, 9800, 211)]  # BOS + 46 spread-out token ids


def test_rslora_scale_survives_conversion(tmp_path, tiny_llama, llama_f16):
    """peft scales rsLoRA by alpha/sqrt(r); llama.cpp by alpha/r. The stored alpha must make them equal: llama.cpp's
    base+adapter matches the peft-merged model, and not the same adapter at llama.cpp's naive alpha/r (4x weaker)."""
    r, alpha = 16, 16.0
    adapter = make_adapter(tiny_llama, tmp_path / "adapter", targets=["q_proj", "v_proj", "down_proj"], r=r,
                           alpha=alpha, rslora=True, b_std=0.03, seed=1)
    src = inspect_adapter(adapter)
    assert src.scale == pytest.approx(alpha / math.sqrt(r))
    result = export_gguf_lora(adapter, tmp_path / "out", base=tiny_llama, verify=False)
    meta = read_lora_gguf(result.adapter)
    assert meta["alpha"] / r == pytest.approx(alpha / math.sqrt(r), rel=1e-6)
    # The B tensors are peft's own, unscaled: the whole correction is in alpha.
    from safetensors.numpy import load_file

    peft_b = {k: v for k, v in load_file(adapter / "adapter_model.safetensors").items() if "lora_B" in k}
    gguf_b = [t for n, t in meta["tensors"].items() if n.endswith(".lora_b")]
    assert len(gguf_b) == len(peft_b) and all(abs(t).max() > 0 for t in gguf_b)
    got = _llama_cpp_logits(llama_f16, result.adapter, IDS)
    want = _merged_logits(tiny_llama, adapter, IDS)
    naive = _merged_logits(tiny_llama, adapter, IDS, scale_factor=1 / math.sqrt(r))  # alpha/r instead
    base = _llama_cpp_logits(llama_f16, None, IDS)
    kl_ok, kl_naive, effect = _kl(want, got), _kl(naive, got), _kl(got, base)
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.97
    assert kl_ok < 1e-3 and kl_naive > 20 * kl_ok and effect > 20 * kl_ok, (kl_ok, kl_naive, effect)


def test_phi3_fused_layout_adapter(tmp_path, tiny_phi3):
    base = export_gguf(tiny_phi3, tmp_path / "base", quants=("f16",), verify=False).files["f16"]
    adapter = make_adapter(tiny_phi3, tmp_path / "adapter", targets=PHI3_TARGETS, r=4, alpha=8, seed=2)
    result = export_gguf_lora(adapter, tmp_path / "out", base=tiny_phi3, verify=False)
    names = set(read_lora_gguf(result.adapter)["tensors"])
    assert "blk.0.attn_qkv.weight.lora_a" in names and "blk.1.ffn_up.weight.lora_b" in names
    got = _llama_cpp_logits(base, result.adapter, IDS)
    want = _merged_logits(tiny_phi3, adapter, IDS)
    kl_ok, effect = _kl(want, got), _kl(got, _llama_cpp_logits(base, None, IDS))
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.97
    assert kl_ok < 1e-3 and effect > 20 * kl_ok, (kl_ok, effect)


@pytest.mark.slow
def test_a_wrong_scale_fails_verification(tmp_path, tiny_llama, llama_f16, monkeypatch):
    """The verification that guards the rsLoRA fix fails when the stored alpha is peft's plain alpha."""
    from care.export import lora_source

    adapter = make_adapter(tiny_llama, tmp_path / "adapter", targets=["q_proj", "v_proj", "down_proj"], r=16,
                           alpha=16, rslora=True, b_std=0.03, seed=1)
    monkeypatch.setattr(lora_source.AdapterSource, "stored_alpha", property(lambda self: self.alpha))
    with pytest.raises(VerificationError) as err:
        export_gguf_lora(adapter, tmp_path / "out", base=tiny_llama, verify_base=llama_f16, n_threads=1,
                         verify_kwargs={"max_tokens": 64})
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["verified"] is False and "base+adapter" in str(err.value)


@pytest.mark.parametrize(("kwargs", "option"), [
    ({"use_dora": True}, "use_dora"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"targets": ["q_proj", "embed_tokens"]}, "target_modules"),
])
def test_rejects_what_llama_cpp_cannot_apply(tmp_path, tiny_llama, kwargs, option):
    targets = kwargs.pop("targets", ["q_proj", "v_proj"])
    adapter = make_adapter(tiny_llama, tmp_path / "adapter", targets=targets, **kwargs)
    with pytest.raises(ExportError) as err:
        export_gguf_lora(adapter, tmp_path / "out", base=tiny_llama, verify=False)
    line = err.value.one_line()
    assert option in line and "\n" not in line
    assert not (tmp_path / "out").exists()


def test_base_from_care_records_not_base_model_name_or_path(tmp_path, tiny_llama, llama_f16):
    """`base_model_name_or_path` names the training machine's folder; care_adapter.json finds the real one."""
    adapter = make_adapter(tiny_llama, tmp_path / "adapter", targets=["q_proj"])
    cfg_path = adapter / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = "/home/trainer/gpu-box/models/unsloth-bnb-4bit"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ModelNotFoundError) as err:
        export_gguf_lora(adapter, tmp_path / "out", verify=False)
    assert "--base" in err.value.one_line()
    # The recipe next to the adapter names the base (as `care train` writes resolved_config.yaml).
    (tmp_path / "resolved_config.yaml").write_text(f"model:\n  base: {tiny_llama}\n")
    result = export_gguf_lora(adapter, tmp_path / "out", verify=False, verify_base=llama_f16)
    assert result.base.path == tiny_llama and result.base.source == "resolved_config.yaml"
    meta = read_lora_gguf(result.adapter)
    assert meta["alpha"] == pytest.approx(16.0) and meta["adapter_type"] == "lora"
    manifest = json.loads(result.manifest_path.read_text())
    assert manifest["verified"] is None and manifest["adapter"]["type"] == "f16"
    assert manifest["adapter"]["sha256"] == hashlib.sha256(result.adapter.read_bytes()).hexdigest()
    assert manifest["lora"]["target_modules"] == ["q_proj"] and manifest["base"]["model"] == tiny_llama.name
    # No local folder in what ships (the converter's metadata heuristics copy config paths).
    assert str(tmp_path) not in result.manifest_path.read_text()
    assert not [v for v in meta["kv"].values() if isinstance(v, str) and v.startswith("/")]
    text = result.modelfile_path.read_text()
    assert f"FROM ./{llama_f16.name}" in text and f"ADAPTER ./{result.adapter.name}" in text
    assert 'PARAMETER stop "<|im_end|>"' in text and "<|im_start|>{{ .Role }}" in text
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_embedded_smollm_adapter_end_to_end(tmp_path, embedded_gguf):
    """SmolLM2 (embedded, the default base): adapter -> GGUF, verified on the shipped GGUF itself, beside a merged
    export of the same quant."""
    from care.train.modeling import gguf_to_folder

    base_dir = gguf_to_folder(embedded_gguf)
    adapter = make_adapter(base_dir, tmp_path / "adapter", targets=LLAMA_TARGETS, r=8, alpha=16, rslora=True,
                           b_std=0.01, care_info={"base_model": str(base_dir), "recipe_base": "embedded"})
    result = export_gguf_lora(adapter, tmp_path / "out", n_threads=1, verify_kwargs={"max_tokens": 96})
    report = result.verify_report
    assert result.base_gguf == embedded_gguf and report["passed"], report["failures"]
    assert report["adapter_effect_kl"] > report["files"]["base+adapter"]["kl_mean"]
    assert result.adapter.stat().st_size < embedded_gguf.stat().st_size / 5
