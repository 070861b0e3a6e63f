"""Where this process sits in a multi-process launch (`accelerate launch`, `torchrun`).

Read from the launcher's environment (RANK / WORLD_SIZE / LOCAL_RANK, ACCELERATE_USE_FSDP / _DEEPSPEED)
rather than from accelerate's PartialState: its `process_index` is this same RANK, and building it here
would initialise the process group before the Trainer picks its own backend and device.
"""

from __future__ import annotations

import os

from care.errors import ConfigError


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def is_distributed() -> bool:
    return world_size() > 1


def is_main_process() -> bool:
    """True on the one process that writes files (rank 0), and in a plain single-process run."""
    return rank() == 0


def sharding() -> str | None:
    """'fsdp' or 'deepspeed' when accelerate launched us with that plugin (the model is sharded, so it is
    loaded without a device map and its 4-bit weights are stored in the compute dtype), else None (DDP or
    a single process)."""
    truthy = ("1", "true", "yes")
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in truthy:
        return "fsdp"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in truthy:
        return "deepspeed"
    return None


def refuse_in_launch(command: str) -> None:
    """Single-process commands (merge) must not run once per GPU: N copies would write the same folder."""
    if is_distributed() or "LOCAL_RANK" in os.environ:
        raise ConfigError(f"`care {command}` runs in one process, not under accelerate launch/torchrun "
                          f"(WORLD_SIZE={world_size()}, LOCAL_RANK={os.environ.get('LOCAL_RANK', '-')})",
                          hint=f"Run `care {command} ...` directly, after the distributed training has finished")
