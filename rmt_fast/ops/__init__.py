"""rmt_fast ops: one entry point per op, dispatching to a backend.

Ops: :func:`memory_attention` (softmax attention under the RMT segment mask, ``memory_attention/``) and
:func:`segment_handoff` (memory from one segment's last hidden states into the next segment's input,
``segment_handoff/``). Each op folder holds its reference (plain PyTorch, the specification) beside the fused
backends, registered as ``torch.library`` custom ops in the namespace ``rmt_fast``.

``backend``:

- "reference": plain PyTorch, any device.
- "sdpa": PyTorch's ``scaled_dot_product_attention``, for layouts whose mask is plain causal or full
  (``SegmentLayout.is_plain``); the handoff has no SDPA form and runs its reference.
- "triton": sm_80+ GPUs, or CPU tensors under ``TRITON_INTERPRET=1``.
- "cuda": the compiled ``rmt_fast._C`` extension (prebuilt, or built on first use), sm_61+.
- "auto": "sdpa" for plain layouts (every device); otherwise "reference" on the CPU, and on a GPU "triton"
  (sm_80+ with triton importable), else "cuda" (extension built), else "reference" with one warning.

An explicit backend that cannot run raises ValueError.
"""
from __future__ import annotations

import functools
import os
import warnings

import torch

from .memory_attention import check_fused_inputs, fused_memory_attention
from .memory_attention import kernels as _attention_kernels
from .memory_attention.reference import memory_attention_ref
from .memory_attention.sdpa import memory_attention_sdpa
from .memory_attention.spec import SegmentLayout, check_attention_inputs
from .segment_handoff import gather_memory, place_memory
from .segment_handoff.reference import gather_memory_ref, place_memory_ref

__all__ = ["SegmentLayout", "memory_attention", "segment_handoff", "resolve_backend", "BACKENDS"]

BACKENDS = ("auto", "reference", "sdpa", "triton", "cuda")
_warned: set[str] = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=5)  # the op's caller


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        _attention_kernels("triton")
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
    layout ("sdpa" resolves to "reference": the choice of SDPA for plain layouts is :func:`memory_attention`'s).

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


def memory_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: SegmentLayout,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Softmax attention under the RMT segment mask (see :class:`SegmentLayout` and ``memory_attention/spec.py``).

    q: ``[B, Hq, N, D]``; k, v: ``[B, Hkv, N, D]``, ``Hq % Hkv == 0``; scale: default ``D ** -0.5``.
    Returns ``[B, Hq, N, D]`` in q's dtype. Outputs at padding positions (``>= layout.valid_lens[b]``) are
    unspecified; valid outputs never depend on padded k/v.

    No host synchronisation on the fused paths ("sdpa", "triton", "cuda"): ``valid_lens <= N`` is the caller's
    promise there (the kernels clamp to N); only the reference checks it.
    """
    if backend in ("auto", "sdpa") and layout.is_plain:
        return memory_attention_sdpa(q, k, v, layout, scale)
    if backend == "sdpa":
        raise ValueError(f"backend='sdpa' needs a plain layout (causal without memory_bidirectional, or dense), got "
                         f"layout causal={layout.causal}, memory_bidirectional={layout.memory_bidirectional}, "
                         f"dense={layout.dense}")
    impl = resolve_backend(backend, q.device)
    if impl == "reference":
        return memory_attention_ref(q, k, v, layout, scale)
    check_attention_inputs(q, k, v, layout)
    check_fused_inputs(q, k, v, impl)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    seq_lens = layout.seq_lens_int32
    if seq_lens.device != q.device:  # a layout built on another device: copied on every call
        seq_lens = seq_lens.to(q.device)
    return fused_memory_attention(q, k, v, seq_lens, layout.num_read, layout.num_write, layout.causal,
                                  layout.bidirectional, scale, impl)


def segment_handoff(
    hidden: torch.Tensor | None,
    memory: torch.Tensor,
    gather_offsets: torch.Tensor | None,
    token_embeds: torch.Tensor | None,
    read_offset: int,
    write_offsets: torch.Tensor | None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One memory handoff between segments: gather each row's new memory, place it into the next segment's input.

    hidden: ``[B, N_prev, d]`` last-layer states of the previous segment, or None (no gather).
    memory: ``[B, m, d]`` the memory that entered the previous segment.
    gather_offsets: ``[B]`` int; row b's new memory is ``hidden[b, g_b : g_b + m]`` (``g_b + m <= N_prev``), or
        ``memory[b]`` where ``g_b < 0`` (the row had no segment). Required with ``hidden``.
    token_embeds: ``[B, N, d]`` the next segment's input embeddings (anything at the memory slots), or None
        (no placement).
    read_offset: first read slot of every row (0 for decoders, 1 for encoders after [CLS]).
    write_offsets: ``[B]`` int, first write slot of each row, or None (no write slots). Slots lie inside
        ``[0, N)`` and a row's read and write blocks do not overlap.

    Returns ``(new_memory [B, m, d], inputs_embeds [B, N, d] or None)``: new_memory in hidden's dtype (``memory``
    itself without hidden), inputs_embeds in token_embeds' dtype with new_memory at the read and write slots.
    The three call forms (both; gather only: ``token_embeds=None``; place only: ``hidden=None``) run natively on
    every backend; the recurrence calls the two halves around the backbone. Gradients flow to ``hidden``
    (gathered rows), ``memory`` (kept rows and the placed copies) and ``token_embeds`` (positions not overwritten).
    """
    impl = resolve_backend(backend, memory.device)
    m = memory.shape[1]
    if hidden is not None and m > 0:
        if gather_offsets is None:
            raise ValueError("gather_offsets is required when hidden is given")
        if impl == "reference":
            memory = gather_memory_ref(hidden, memory, gather_offsets)
        else:
            memory = gather_memory(hidden, memory, gather_offsets, impl)
    if token_embeds is None or m == 0:
        return memory, token_embeds
    if not 0 <= read_offset <= token_embeds.shape[1] - m:
        raise ValueError(f"read_offset must be in [0, {token_embeds.shape[1] - m}] so that {m} read slots fit into "
                         f"{token_embeds.shape[1]} positions, got {read_offset}")
    if impl == "reference":
        return memory, place_memory_ref(memory, token_embeds, read_offset, write_offsets)
    return memory, place_memory(memory, token_embeds, int(read_offset), write_offsets, impl)
