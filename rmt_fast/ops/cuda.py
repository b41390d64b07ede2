"""The compiled extension ``rmt_fast._C``: torch-free CUDA kernels (csrc/*.cu, sm_61+) and their torch bindings.

Imports without the extension (not built, or ``RMT_FAST_NO_EXT=1``): then :func:`available` is False.
``memory_attention/cuda.py`` and ``segment_handoff/cuda.py`` call its functions.
"""
from __future__ import annotations

import types

import torch

try:
    from rmt_fast import _C  # type: ignore[attr-defined]
except ImportError:
    _C = None

# op name -> the extension functions it needs
_OPS = {
    "memory_attention": ("memory_attention_fwd", "memory_attention_bwd"),
    "segment_handoff": ("gather_memory_fwd", "gather_memory_bwd", "place_memory_fwd", "place_memory_bwd"),
}


def available() -> bool:
    """Whether the extension is built and a CUDA device is present."""
    return _C is not None and torch.cuda.is_available()


def has_op(name: str) -> bool:
    """Whether the extension is usable and provides op ``name`` ("memory_attention" | "segment_handoff")."""
    return available() and all(hasattr(_C, fn) for fn in _OPS[name])


def extension(op: str) -> types.ModuleType:
    """The extension module, or RuntimeError naming ``op`` when it is not usable."""
    if not has_op(op):
        raise RuntimeError(f"rmt_fast: the CUDA extension rmt_fast._C with {op} is not available "
                           "(not built, or no CUDA device); use backend='reference' or 'triton'")
    return _C
