"""Load a local safetensors checkpoint without memory-mapping it.

transformers maps every shard and keeps all of them mapped until the whole model is built, so each weight it
touches stays in the process's RSS as a file page: a 3.8B bf16 checkpoint adds its full 7.6 GB on top of
the model being built (measured: 2.2 GB anonymous + 2.8 GB file pages at 30% of a QLoRA load, heading for
~10 GB). safetensors' `pread` backend reads each tensor's bytes on demand into ordinary memory that is
freed once the tensor is converted (quantized to NF4, cast), so peak RSS stays near the finished model.
transformers itself uses that backend only on Windows and MPS, hence this small wrapper: the same lazy
slices it builds for itself, handed over as `state_dict`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def from_pretrained(base: str, **kwargs: Any):
    """`AutoModelForCausalLM.from_pretrained(base, **kwargs)`, reading a local folder's safetensors with pread
    (same weights, same loading code path for quantization and dtype; the generation config and the model's
    name_or_path are restored as a normal load sets them)."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    folder = Path(base)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return AutoModelForCausalLM.from_pretrained(base, **kwargs)
    from safetensors import safe_open

    state: dict[str, Any] = {}
    for f in files:
        handle = safe_open(str(f), framework="pt", device="cpu", backend="pread")
        for key in handle.keys():  # noqa: SIM118 - a safe_open handle is not a dict
            state[key] = handle.get_slice(key)  # read when transformers converts this tensor
    config = AutoConfig.from_pretrained(base)
    cls = AutoModelForCausalLM._model_mapping[type(config)]
    model = cls.from_pretrained(None, config=config, state_dict=state, **kwargs)
    model.config._name_or_path = model.name_or_path = str(base)
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(base)
    return model


def release_memory() -> None:
    """Collect freed models and hand glibc's free heap back to the OS. After a model is deleted, its
    many mid-sized tensors (a few MB to tens of MB: under glibc's grown mmap threshold) stay in the heap as
    free but resident memory; the next model would then sit on top of them in the peak RSS."""
    import ctypes
    import gc
    import sys

    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl): nothing to trim
            pass


def large_allocations_via_mmap(threshold: int = 1 << 20) -> None:
    """Serve every allocation >= `threshold` with its own mmap, returned to the OS on free (glibc only).

    glibc's dynamic threshold climbs to 32 MB after the first large free, so a 3.8B model's 19-32 MB matrices
    replaced one by one (peft's merge_and_unload) pile up as free but resident heap: 1.7 GB at Phi-3.5 size.
    A fixed threshold turns that off."""
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").mallopt(-3, threshold)  # M_MMAP_THRESHOLD
        except (OSError, AttributeError):  # not glibc (musl): nothing to tune
            pass
