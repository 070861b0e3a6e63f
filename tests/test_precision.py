"""Training precision by device capability: the decision over a table of devices, and where it is recorded."""

from __future__ import annotations

import logging

import pytest

from care.errors import ConfigError
from care.train.precision import Device, normalize_dtype, resolve_precision

P100 = Device("cuda", "Tesla P100-PCIE-16GB", (6, 0))
T4 = Device("cuda", "Tesla T4", (7, 5))
V100 = Device("cuda", "Tesla V100-SXM2-16GB", (7, 0))
A10 = Device("cuda", "NVIDIA A10G", (8, 6))
A100 = Device("cuda", "NVIDIA A100-SXM4-40GB", (8, 0))
H100 = Device("cuda", "NVIDIA H100 80GB HBM3", (9, 0))
K80 = Device("cuda", "Tesla K80", (3, 7))
CPU = Device("cpu")
# On ROCm torch reports a capability that is not NVIDIA's: (9, 0) for an MI210 would read as "bf16" if trusted.
MI210 = Device("rocm", "AMD Instinct MI210", (9, 0), "gfx90a:sramecc+:xnack-")
MI300X = Device("rocm", "AMD Instinct MI300X", (9, 4), "gfx942:sramecc+:xnack-")
RX6800 = Device("rocm", "AMD Radeon RX 6800", (10, 3), "gfx1030")
MI100 = Device("rocm", "AMD Instinct MI100", (9, 0), "gfx908:sramecc+:xnack-")

# device -> (compute, Trainer bf16 flag, Trainer fp16 flag = loss scaling)
AUTO_TABLE = [
    (P100, "float16", False, True),
    (T4, "float16", False, True),
    (V100, "float16", False, True),
    (A10, "bfloat16", True, False),
    (A100, "bfloat16", True, False),
    (H100, "bfloat16", True, False),
    (K80, "float32", False, False),
    (CPU, "float32", False, False),
    (MI210, "bfloat16", True, False),
    (MI300X, "bfloat16", True, False),
    (RX6800, "float16", False, True),
    (MI100, "float16", False, True),
]


@pytest.mark.parametrize(("device", "compute", "bf16", "fp16"), AUTO_TABLE, ids=lambda v: getattr(v, "name", None))
def test_auto_precision_by_device(device, compute, bf16, fp16):
    p = resolve_precision(device, "auto")
    assert (p.compute, p.bf16, p.fp16, p.loss_scaling) == (compute, bf16, fp16, fp16)
    assert p.lora_weights == "float32"  # the scaler and the optimizer work on float32 adapter weights
    assert p.warning is None
    assert p.requested == "auto" and p.reason


@pytest.mark.parametrize("device", [P100, T4, V100, RX6800])
def test_explicit_bf16_without_units_wins_with_a_one_line_warning(device):
    p = resolve_precision(device, "bf16")
    assert p.compute == "bfloat16" and p.bf16 and not p.fp16
    assert p.warning and "\n" not in p.warning
    assert "slower" in p.warning and "emulates" in p.warning and device.name in p.warning


@pytest.mark.parametrize("device", [A100, H100, A10, MI300X])
def test_explicit_dtypes_win_silently_where_supported(device):
    for req, compute in (("float16", "float16"), ("bfloat16", "bfloat16"), ("fp32", "float32")):
        p = resolve_precision(device, req)
        assert p.compute == compute and p.warning is None
        assert p.fp16 == (compute == "float16") and p.bf16 == (compute == "bfloat16")


def test_cpu_never_mixed_precision_and_warns_on_explicit_half():
    p = resolve_precision(CPU, "bfloat16")
    assert p.compute == "bfloat16" and not p.bf16 and not p.fp16
    assert p.warning and "CPU" in p.warning
    assert resolve_precision(CPU, "float32").warning is None


def test_unknown_dtype_is_a_config_error():
    assert normalize_dtype(None) == "auto"
    with pytest.raises(ConfigError, match="float8"):
        resolve_precision(T4, "float8")


def test_compute_dtype_on_this_machine_matches_the_rule():
    import torch

    from care.train.modeling import compute_dtype
    from care.train.precision import detect_devices

    dev = detect_devices()[0]
    expected = resolve_precision(dev, "auto").compute
    assert compute_dtype("auto") == getattr(torch, expected)
    assert compute_dtype("fp16") == torch.float16


def test_training_run_records_precision(tmp_path, tiny_llama, monkeypatch, caplog):
    """The resolved choice lands in resolved_config.yaml and the log; a simulated T4 with an explicit bf16
    recipe gets the warning, and the saved config still loads as the same recipe."""
    import yaml

    from care.train import precision as prec_mod
    from care.train import sft
    from care.train.config import load_recipe, recipe_from_dict

    data = tmp_path / "d.jsonl"
    data.write_text('{"query": "q", "response": "r"}\n')
    recipe = recipe_from_dict({"model": {"base": str(tiny_llama)}, "data": {"sources": [{"path": str(data)}]},
                               "quant": {"compute_dtype": "bf16"}})
    monkeypatch.setattr(prec_mod, "training_device", lambda: T4)
    with caplog.at_level(logging.INFO, logger="care.train.sft"):
        text = recipe.to_yaml() + sft._resolved_precision(recipe)
    saved = yaml.safe_load(text)["resolved"]
    assert saved["device"].startswith("Tesla T4")
    assert saved["precision"]["compute"] == "bfloat16" and saved["precision"]["requested"] == "bfloat16"
    assert any("emulates" in r.message and r.levelno == logging.WARNING for r in caplog.records)
    assert any("precision on Tesla T4" in r.message for r in caplog.records)
    path = tmp_path / "resolved_config.yaml"
    path.write_text(text)
    assert load_recipe(path).hash() == recipe.hash()


def test_fp16_base_gets_float32_lora_weights(tiny_llama):
    """What fp16 loss scaling relies on: peft keeps the adapter float32 on a float16 base model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float16)
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    dtypes = {p.dtype for p in model.parameters() if p.requires_grad}
    assert dtypes == {getattr(torch, resolve_precision(T4).lora_weights)}
