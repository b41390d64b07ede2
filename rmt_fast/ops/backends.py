"""Which backend runs an op: the names :func:`resolve_backend` accepts and the rule behind "auto".

- "reference": plain PyTorch, any device.
- "sdpa": PyTorch's ``scaled_dot_product_attention``, for layouts whose mask is plain causal or full
  (``SegmentLayout.is_plain``); the handoff has no SDPA form and runs its reference.
- "triton": sm_80+ GPUs, or CPU tensors under ``TRITON_INTERPRET=1``.
- "cuda": the compiled ``rmt_fast._C`` extension (prebuilt, or built on first use), sm_61+.
- "auto": "sdpa" for plain layouts (every device); otherwise "reference" on the CPU, and on a GPU "triton"
  (sm_80+ with triton importable), else "cuda" (extension built), else "reference" with one warning.
  A layout with a short-term cache takes the same choice, except that on a GPU where it would be "reference",
  SDPA with the layout's boolean mask runs instead (measured end to end on an H100, the fused Triton cache kernel
  is faster than masked SDPA: benchmarks/RESULTS.md, "Short-term cache").

An explicit backend that cannot run raises ValueError.
"""
from __future__ import annotations

import functools
import os
import warnings

import torch

__all__ = ["BACKENDS", "resolve_backend", "triton_available", "cuda_ext_available"]

BACKENDS = ("auto", "reference", "sdpa", "triton", "cuda")
_warned: set[str] = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=5)  # the op's caller


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    from .memory_attention import kernels

    try:
        kernels("triton")
    except Exception:  # triton missing or broken: the caller falls back
        return False
    return True


def cuda_ext_available() -> bool:
    """Whether the rmt_fast._C extension is built (with both ops: not a stale build) and a GPU is present."""
    from . import cuda

    return cuda.has_op("memory_attention") and cuda.has_op("segment_handoff")


@torch.compiler.assume_constant_result  # torch.compile takes the answer as a constant instead of tracing it
def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend ("reference" | "triton" | "cuda") that ``backend`` names for tensors on ``device``, whatever the
    layout ("sdpa" resolves to "reference": the choice of SDPA for plain layouts is
    :func:`rmt_fast.ops.memory_attention.memory_attention`'s).

    Raises ValueError for an unknown name or an explicit backend that cannot run there.
    """
    return _resolve_backend(backend, device)


@functools.lru_cache(maxsize=None)
def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend in ("reference", "sdpa"):
        return "reference"
    if backend == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before import for CPU "
                             "tensors")
        if not triton_available():
            raise ValueError("backend='triton' requested but triton does not import")
        return backend
    if backend == "cuda":
        if device.type != "cuda":
            raise ValueError("backend='cuda' needs CUDA tensors")
        if not cuda_ext_available():
            from . import cuda

            raise ValueError(f"backend='cuda' requested but the rmt_fast._C extension is not available "
                             f"({cuda.why_not()}); `rmt-fast env` says more")
        return backend
    if device.type != "cuda":
        return "reference"
    major, _ = torch.cuda.get_device_capability(device)
    if major >= 8 and triton_available():
        return "triton"
    if cuda_ext_available():
        return "cuda"
    from . import cuda

    if cuda.disabled():  # otherwise rmt_fast.ops.cuda has already warned why there is no extension
        _warn_once("auto-fallback", "rmt_fast: no Triton (sm_80+) on this GPU and the CUDA extension is disabled "
                   "(RMT_FAST_NO_EXT=1); using the reference path (slower, same results)")
    return "reference"
