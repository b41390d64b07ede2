"""rmt_fast ops: one entry point per op, dispatching to the reference, Triton or CUDA implementation.

``backend``: "reference" (plain PyTorch, the specification), "triton" (sm_80+ GPUs, or CPU tensors under
``TRITON_INTERPRET=1``), "cuda" (the compiled ``rmt_fast._C`` extension, sm_61+), or "auto" (triton on an
sm_80+ GPU when triton imports, else the CUDA extension, else the reference with one warning).
"""
from __future__ import annotations

import functools
import os
import warnings

import torch

from .reference import SegmentLayout, memory_attention_ref, segment_handoff_ref

__all__ = ["SegmentLayout", "memory_attention", "segment_handoff", "resolve_backend", "BACKENDS"]

BACKENDS = ("auto", "reference", "triton", "cuda")
_warned: set[str] = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        from .triton import attention  # noqa: F401
    except Exception:  # triton missing or broken: the caller falls back
        return False
    return True


def cuda_ext_available() -> bool:
    from . import cuda

    return cuda.available()


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend ("reference" | "triton" | "cuda") ``backend`` means for tensors on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return backend
    if backend == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before import for CPU tensors")
        if not triton_available():
            raise ValueError("backend='triton' requested but triton does not import")
        return backend
    if backend == "cuda":
        if device.type != "cuda":
            raise ValueError("backend='cuda' needs CUDA tensors")
        if not cuda_ext_available():
            raise ValueError("backend='cuda' requested but the rmt_fast._C extension is not built")
        return backend
    # auto
    if device.type != "cuda":
        return "reference"
    return _auto_cuda_backend(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _auto_cuda_backend(index: int) -> str:
    major, _ = torch.cuda.get_device_capability(index)
    if major >= 8 and triton_available():
        return "triton"
    if cuda_ext_available():
        return "cuda"
    _warn_once("auto-fallback", "rmt_fast: no Triton (sm_80+) or CUDA extension usable on this GPU; "
               "using the reference path (slower, same results)")
    return "reference"


def memory_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: SegmentLayout,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Softmax attention under the RMT segment mask (see :class:`SegmentLayout`).

    q: ``[B, Hq, N, D]``; k, v: ``[B, Hkv, N, D]``, ``Hq % Hkv == 0``. Returns ``[B, Hq, N, D]`` in q's dtype.
    Outputs at padding positions (``>= layout.valid_lens[b]``) are unspecified; gradients into padded k/v are 0.
    """
    impl = resolve_backend(backend, q.device)
    if impl == "triton":
        from .triton.attention import memory_attention_triton

        return memory_attention_triton(q, k, v, layout, scale)
    if impl == "cuda":
        from .cuda import memory_attention_cuda

        return memory_attention_cuda(q, k, v, layout, scale)
    return memory_attention_ref(q, k, v, layout, scale)


def segment_handoff(
    hidden: torch.Tensor | None,
    memory: torch.Tensor,
    gather_offsets: torch.Tensor | None,
    token_embeds: torch.Tensor,
    read_offset: int,
    write_offsets: torch.Tensor | None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read each row's new memory from ``hidden`` and write it into the next segment's input embeddings.

    See :func:`rmt_fast.ops.reference.segment_handoff_ref` for shapes and semantics.
    """
    impl = resolve_backend(backend, memory.device)
    if impl == "triton":
        from .triton.handoff import segment_handoff_triton

        return segment_handoff_triton(hidden, memory, gather_offsets, token_embeds, read_offset, write_offsets)
    if impl == "cuda":
        from . import cuda

        if cuda.has_op("segment_handoff"):
            return cuda.segment_handoff_cuda(hidden, memory, gather_offsets, token_embeds, read_offset, write_offsets)
    return segment_handoff_ref(hidden, memory, gather_offsets, token_embeds, read_offset, write_offsets)
