"""Memory-token attention: ``spec.py`` (layout, mask rule, checks), ``reference.py`` and ``sdpa.py`` (plain
PyTorch), and the fused kernels ``triton.py`` and ``cuda.py`` behind the custom ops ``rmt_fast::memory_attention``
and ``rmt_fast::memory_attention_backward`` (defined here, so ``torch.compile`` traces through them).

The entry point that picks a backend (see :mod:`rmt_fast.ops.backends`) is :func:`memory_attention`, here:
``from rmt_fast.ops.memory_attention import memory_attention``.
"""
from __future__ import annotations

import functools
import importlib
import types
from typing import Optional

import torch
from torch import Tensor

from ..backends import resolve_backend
from .reference import memory_attention_ref
from .sdpa import memory_attention_sdpa, memory_attention_sdpa_masked
from .spec import SegmentLayout, check_attention_inputs, mask_rule

__all__ = ["memory_attention", "SegmentLayout", "check_attention_inputs", "mask_rule", "check_fused_inputs",
           "fused_memory_attention", "kernels"]

MAX_HEAD_DIM = 128  # of both fused backends
_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # cuda computes bfloat16 in float32


@functools.lru_cache(maxsize=None)
def kernels(backend: str) -> types.ModuleType:
    """The module of a fused backend ("triton" | "cuda"): ``forward``, ``backward``."""
    return importlib.import_module(f"{__name__}.{backend}")


def check_fused_inputs(q: Tensor, k: Tensor, v: Tensor, backend: str) -> None:
    """What the fused kernels take beyond the shape rules: one dtype of fp16 / bf16 / fp32, head dim 1..128."""
    if q.dtype not in _FUSED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype of float16, bfloat16 or float32 for backend={backend!r}, got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if not 1 <= q.shape[-1] <= MAX_HEAD_DIM:
        raise ValueError(f"the head dim must be in [1, {MAX_HEAD_DIM}] for backend={backend!r}, got {q.shape[-1]}")


@torch.library.custom_op("rmt_fast::memory_attention", mutates_args=())
def fused_attention(q: Tensor, k: Tensor, v: Tensor, seq_lens: Tensor, num_read: int, num_write: int, causal: bool,
                    bidirectional: bool, scale: float, backend: str, num_cache: int = 0,
                    cache_lens: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Memory attention on the fused kernels of ``backend`` ("triton" | "cuda"), inputs already checked.

    q: ``[B, Hq, N, D]``; k, v: ``[B, Hkv, num_cache + N, D]`` of q's dtype; seq_lens: ``[B]`` int32 on q's device.
    With ``num_cache > 0`` the first ``num_cache`` keys are the short-term cache, ``cache_lens`` ``[B]``
    int32 on q's device its real entries per row (None: all). Returns ``(out [B, Hq, N, D] in q's dtype,
    lse [B, Hq, N] fp32)``; lse (base-2 log-sum-exp of each query's scores) is kept for the backward.
    """
    return kernels(backend).forward(q, k, v, seq_lens, num_read, num_write, causal, bidirectional, scale,
                                    num_cache, cache_lens)


def _like(x: Tensor, backend: str) -> Tensor:
    """An output shaped like ``x`` with the strides the backend gives it (Triton keeps x's layout)."""
    return torch.empty_like(x) if backend == "triton" and x.stride(-1) == 1 else x.new_empty(x.shape)


@fused_attention.register_fake
def _(q, k, v, seq_lens, num_read, num_write, causal, bidirectional, scale, backend, num_cache=0, cache_lens=None):
    return _like(q, backend), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("rmt_fast::memory_attention_backward", mutates_args=())
def fused_attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                             seq_lens: Tensor, num_read: int, num_write: int, causal: bool, bidirectional: bool,
                             scale: float, backend: str, num_cache: int = 0,
                             cache_lens: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients ``(dq, dk, dv)`` of :func:`fused_attention` for the output gradient ``dout`` ``[B, Hq, N, D]``."""
    return kernels(backend).backward(dout, q, k, v, out, lse, seq_lens, num_read, num_write, causal, bidirectional,
                                     scale, num_cache, cache_lens)


@fused_attention_backward.register_fake
def _(dout, q, k, v, out, lse, seq_lens, num_read, num_write, causal, bidirectional, scale, backend, num_cache=0,
      cache_lens=None):
    return _like(q, backend), _like(k, backend), _like(v, backend)


def _setup_context(ctx, inputs, output):
    q, k, v, seq_lens, *mask_args, cache_lens = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, seq_lens, cache_lens)
    ctx.mask_args = mask_args  # (num_read, num_write, causal, bidirectional, scale, backend, num_cache)
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # no zeros tensor for lse's (absent) gradient


def _backward(ctx, dout, _dlse):
    *saved, cache_lens = ctx.saved_tensors
    dq, dk, dv = fused_attention_backward(dout, *saved, *ctx.mask_args, cache_lens)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


fused_attention.register_autograd(_backward, setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    """The autograd of the custom op above, calling the kernels without the custom-op dispatch, which costs more
    Python per call than the rest of the op (see fused_memory_attention). Lean on purpose, as it runs once per
    layer and segment: the mask arguments travel as one tuple (autograd inspects every argument of ``apply``),
    and only the output is returned (lse is a saved intermediate, one output less for autograd to track)."""

    @staticmethod
    def forward(ctx, q, k, v, seq_lens, mask_args):
        # mask_args: (num_read, num_write, causal, bidirectional, scale[, num_cache, cache_lens], backend)
        *args, backend = mask_args
        out, lse = kernels(backend).forward(q, k, v, seq_lens, *args)
        ctx.save_for_backward(q, k, v, out, lse, seq_lens)
        ctx.mask_args = mask_args
        return out

    @staticmethod
    def backward(ctx, dout):
        *args, backend = ctx.mask_args
        dq, dk, dv = kernels(backend).backward(dout, *ctx.saved_tensors, *args)
        return dq, dk, dv, None, None


def fused_memory_attention(q: Tensor, k: Tensor, v: Tensor, seq_lens: Tensor, num_read: int, num_write: int,
                           causal: bool, bidirectional: bool, scale: float, backend: str, num_cache: int = 0,
                           cache_lens: Tensor | None = None) -> Tensor:
    """The output of :func:`fused_attention` (same arguments).

    Under ``torch.compile`` this is the custom op, which the compiler traces; eagerly the same kernels and the same
    backward run through a plain ``autograd.Function``: the custom op's dispatch and its generated autograd
    (``register_autograd``) add tens of microseconds of Python per call.
    """
    if torch.compiler.is_compiling():
        return fused_attention(q, k, v, seq_lens, num_read, num_write, causal, bidirectional, scale, backend,
                               num_cache, cache_lens)[0]
    if num_cache:
        return _EagerAttention.apply(q, k, v, seq_lens, (num_read, num_write, causal, bidirectional, scale, num_cache,
                                                         cache_lens, backend))
    return _EagerAttention.apply(q, k, v, seq_lens, (num_read, num_write, causal, bidirectional, scale, backend))


def memory_attention(q: Tensor, k: Tensor, v: Tensor, layout: SegmentLayout, scale: float | None = None,
                     backend: str = "auto") -> Tensor:
    """Softmax attention under the RMT segment mask (see :class:`SegmentLayout` and ``spec.py``).

    q: ``[B, Hq, N, D]``; k, v: ``[B, Hkv, num_cache + N, D]`` (``layout.num_cache`` short-term cache keys first),
    ``Hq % Hkv == 0``; scale: default ``D ** -0.5``; backend: one of :data:`rmt_fast.ops.BACKENDS`. Returns
    ``[B, Hq, N, D]`` in q's dtype. Outputs at padding positions (``>= layout.valid_lens[b]``) are unspecified;
    valid outputs never depend on padded k/v.

    A layout with a short-term cache runs on "reference", "triton" and "cuda"; "auto" takes what it takes for other
    non-plain layouts (Triton on sm_80+ GPUs, else the CUDA extension), and on a GPU with neither, SDPA with the
    layout's boolean mask rather than the reference; "sdpa" raises ValueError for it.

    No host synchronisation on the fused paths ("sdpa", "triton", "cuda"): ``valid_lens <= N`` is the caller's
    promise there (the kernels clamp to N); only the reference checks it.
    """
    if backend in ("auto", "sdpa") and layout.is_plain:
        return memory_attention_sdpa(q, k, v, layout, scale)
    if backend == "sdpa":
        raise ValueError(f"backend='sdpa' needs a plain layout (causal without memory_bidirectional, or dense, and "
                         f"no short-term cache), got layout causal={layout.causal}, memory_bidirectional="
                         f"{layout.memory_bidirectional}, dense={layout.dense}, num_cache={layout.num_cache}")
    impl = resolve_backend(backend, q.device)
    if layout.num_cache and backend == "auto" and q.is_cuda and impl == "reference":
        # no fused kernel on this GPU: PyTorch's masked SDPA beats the reference (end to end the fused Triton cache
        # kernel beats masked SDPA, whose mask is built per call: benchmarks/RESULTS.md, "Short-term cache")
        check_attention_inputs(q, k, v, layout)
        return memory_attention_sdpa_masked(q, k, v, layout, scale)
    if impl == "reference":
        return memory_attention_ref(q, k, v, layout, scale)
    check_attention_inputs(q, k, v, layout)
    check_fused_inputs(q, k, v, impl)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    seq_lens = layout.seq_lens_int32
    if seq_lens.device != q.device:  # a layout built on another device: copied on every call
        seq_lens = seq_lens.to(q.device)
    if layout.num_cache:
        cache_lens = layout.cache_lens_int32
        if cache_lens.device != q.device:
            cache_lens = cache_lens.to(q.device)
        return fused_memory_attention(q, k, v, seq_lens, layout.num_read, layout.num_write, layout.causal,
                                      layout.bidirectional, scale, impl, layout.num_cache, cache_lens)
    return fused_memory_attention(q, k, v, seq_lens, layout.num_read, layout.num_write, layout.causal,
                                  layout.bidirectional, scale, impl)
