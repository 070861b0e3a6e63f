"""Training precision by device capability: one pure decision function, and the device probe that feeds it.

The rule (docs/gpu.md has it as a table):
- NVIDIA compute capability >= 8.0 (Ampere A100/A10/RTX 30xx and newer): bfloat16 compute.
- NVIDIA 6.0 <= capability < 8.0 (Pascal P100, Volta V100, Turing T4): float16 compute, float32 LoRA weights and
  loss scaling (TrainingArguments fp16=True -> a GradScaler), which is what peft and transformers expect: peft's
  `autocast_adapter_dtype` keeps the adapter in float32 so the scaler never unscales fp16 gradients.
- NVIDIA capability < 6.0 (Maxwell and older): float32; fp16 arithmetic there is no faster.
- AMD ROCm: decided from the architecture name (gcnArchName), not from torch's reported capability, which
  on ROCm is a HIP version-like number: MI200 (gfx90a), MI300 (gfx940/941/942) and MI350 (gfx950) have bf16
  matrix units -> bfloat16; any other AMD GPU -> float16 as on pre-Ampere NVIDIA.
- CPU: float32 (no bf16/fp16 matrix units on the CPUs CARE targets: fp32 is ~2x faster there).
- An explicit `quant.compute_dtype` in the recipe wins. bfloat16 on a GPU without bf16 units gets a one-line
  warning: torch emulates it (torch.cuda.is_bf16_supported() says True there by default, including emulation),
  which is several times slower.

`resolve_precision` imports nothing heavy, so tests run it over a table of devices and `care doctor` prints
what it decides.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from care.errors import ConfigError

FP32, BF16, FP16 = "float32", "bfloat16", "float16"
_NAMES = {"float32": FP32, "fp32": FP32, "bfloat16": BF16, "bf16": BF16, "float16": FP16, "fp16": FP16}
# AMD Instinct architectures with bf16 matrix (MFMA) throughput: MI200, MI300, MI350.
ROCM_BF16_ARCHS = ("gfx90a", "gfx940", "gfx941", "gfx942", "gfx950")
BF16_MIN_CAPABILITY = (8, 0)
FP16_MIN_CAPABILITY = (6, 0)


@dataclass(frozen=True)
class Device:
    """One training device as the decision needs it. kind: cpu | cuda (NVIDIA) | rocm (AMD, HIP build)."""

    kind: str
    name: str = ""
    capability: tuple[int, int] | None = None
    arch: str | None = None  # ROCm gcnArchName, e.g. "gfx90a:sramecc+:xnack-"

    def label(self) -> str:
        if self.kind == "cpu":
            return "CPU"
        extra = f"compute capability {self.capability[0]}.{self.capability[1]}" if self.kind == "cuda" and \
            self.capability else (self.arch or "unknown arch")
        return f"{self.name or self.kind} ({extra})"


@dataclass(frozen=True)
class Precision:
    """What training uses: the compute dtype (model weights / 4-bit compute), the LoRA weights' dtype, the
    Trainer's bf16/fp16 flags (fp16 = autocast + loss scaling) and why."""

    compute: str
    lora_weights: str
    bf16: bool
    fp16: bool
    requested: str
    reason: str
    warning: str | None = None

    @property
    def loss_scaling(self) -> bool:
        return self.fp16

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"loss_scaling": self.loss_scaling}


def normalize_dtype(name: str | None) -> str:
    """'auto' or one of float32/bfloat16/float16 (fp32/bf16/fp16 accepted)."""
    if name in (None, "", "auto"):
        return "auto"
    if name not in _NAMES:
        raise ConfigError(f"Unknown compute dtype {name!r}", hint="Use auto, float32, bfloat16 or float16")
    return _NAMES[name]


def has_bf16(device: Device) -> bool:
    """bf16 in hardware (never counting emulation)."""
    if device.kind == "cuda":
        return device.capability is not None and tuple(device.capability) >= BF16_MIN_CAPABILITY
    if device.kind == "rocm":
        return (device.arch or "").split(":")[0] in ROCM_BF16_ARCHS
    return False


def auto_dtype(device: Device) -> tuple[str, str]:
    """(dtype, reason) for compute_dtype: auto."""
    if device.kind == "cpu":
        return FP32, "CPU: no bf16/fp16 matrix units, float32 is fastest"
    if device.kind == "rocm":
        arch = (device.arch or "unknown").split(":")[0]
        if has_bf16(device):
            return BF16, f"AMD {arch} (MI200/MI300 class) has bf16 matrix units"
        return FP16, f"AMD {arch} is not MI200/MI300 class: no bf16 units, float16 with loss scaling"
    cap = tuple(device.capability or (0, 0))
    if cap >= BF16_MIN_CAPABILITY:
        return BF16, f"compute capability {cap[0]}.{cap[1]} >= 8.0 has bf16 units"
    if cap >= FP16_MIN_CAPABILITY:
        return FP16, f"compute capability {cap[0]}.{cap[1]} < 8.0 has no bf16 units: float16 with loss scaling"
    return FP32, f"compute capability {cap[0]}.{cap[1]} < 6.0 has no fast float16: float32"


def resolve_precision(device: Device, requested: str | None = "auto") -> Precision:
    """The training precision for `device` given the recipe's quant.compute_dtype (`requested`)."""
    req = normalize_dtype(requested)
    warning = None
    if req == "auto":
        compute, reason = auto_dtype(device)
    else:
        compute, reason = req, "set in the recipe (quant.compute_dtype)"
        if compute == BF16 and device.kind != "cpu" and not has_bf16(device):
            warning = (f"compute_dtype bfloat16 on {device.label()}, which has no bf16 units: torch emulates it, "
                       f"expect training several times slower than float16 (set quant.compute_dtype: auto)")
        elif compute != FP32 and device.kind == "cpu":
            warning = (f"compute_dtype {compute} on the CPU: no {compute} matrix units, expect training about 2x "
                       f"slower than float32 (set quant.compute_dtype: auto)")
    on_gpu = device.kind != "cpu"
    # Mixed precision only on a GPU; the LoRA weights stay float32 whenever compute is reduced, so the fp16
    # GradScaler (and bf16 optimizer updates) work on float32 master weights.
    return Precision(compute=compute, lora_weights=FP32, bf16=on_gpu and compute == BF16,
                     fp16=on_gpu and compute == FP16, requested=req, reason=reason, warning=warning)


# -- probing this machine (imports torch) ------------------------------------------------------------------

def detect_devices() -> list[Device]:
    """Every visible GPU (cuda or rocm), or [cpu] when none."""
    import torch

    if not torch.cuda.is_available():
        return [Device("cpu")]
    rocm = bool(getattr(torch.version, "hip", None))
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append(Device("rocm" if rocm else "cuda", name=p.name, capability=(p.major, p.minor),
                          arch=getattr(p, "gcnArchName", None) if rocm else None))
    return out


def training_device() -> Device:
    """The device training runs on (the first GPU, else the CPU)."""
    return detect_devices()[0]


def torch_dtype(name: str):
    import torch

    return {FP32: torch.float32, BF16: torch.bfloat16, FP16: torch.float16}[name]
