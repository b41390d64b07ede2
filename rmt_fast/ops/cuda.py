"""Thin loader of the compiled ``rmt_fast._C`` extension (CUDA C++ kernels, sm_61+)."""
from __future__ import annotations

import torch

try:
    from rmt_fast import _C  # type: ignore[attr-defined]
except ImportError:  # built without CUDA, or RMT_FAST_NO_EXT=1
    _C = None


def available() -> bool:
    return _C is not None and torch.cuda.is_available()


def has_op(name: str) -> bool:
    return available() and hasattr(_C, name)
