"""The process an experiment runs in: device choice, bf16 autocast, torch.distributed (torchrun), seeds."""
from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch

__all__ = ["resolve_device", "autocast_ctx", "seed_everything", "dist_info", "init_distributed"]


def resolve_device(pref: str | None = "auto", local_rank: int = 0) -> torch.device:
    """"auto" (cuda:local_rank if available, else cpu), "cpu", "cuda" (-> cuda:local_rank) or "cuda:N"."""
    if pref in (None, "auto"):
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    dev = torch.device(pref)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device: CUDA was asked for but torch.cuda.is_available() is False")
        if dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
    return dev


def autocast_ctx(device: torch.device, bf16: bool):
    """bf16 autocast on CUDA when ``bf16``; nothing on the CPU (fp32 there)."""
    if torch.device(device).type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def dist_info() -> tuple[int, int, int]:
    """(rank, world_size, local_rank); (0, 1, 0) outside torch.distributed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return 0, 1, 0


def init_distributed(device_pref: str) -> bool:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1): nccl on CUDA, gloo on the CPU.
    Returns True if this call initialised it (the caller then destroys it)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    use_cuda = torch.cuda.is_available() and device_pref != "cpu"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return True
