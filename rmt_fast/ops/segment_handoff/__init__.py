"""The segment handoff: ``reference.py`` (plain PyTorch, the specification) and the fused kernels ``triton.py`` and
``cuda.py`` behind the custom ops ``rmt_fast::gather_memory`` and ``rmt_fast::place_memory`` (with their backward
ops; defined here, so ``torch.compile`` traces through them).

The entry point that picks a backend (see :mod:`rmt_fast.ops.backends`) is :func:`segment_handoff`, here:
``from rmt_fast.ops.segment_handoff import segment_handoff``.
"""
from __future__ import annotations

import functools
import importlib
import types

import torch
from torch import Tensor

from ..backends import resolve_backend
from .reference import gather_memory_ref, place_memory_ref

__all__ = ["segment_handoff", "gather_memory", "place_memory", "kernels"]


@functools.lru_cache(maxsize=None)
def kernels(backend: str) -> types.ModuleType:
    """The module of a fused backend ("triton" | "cuda"): ``gather_forward/backward``, ``place_forward/backward``."""
    return importlib.import_module(f"{__name__}.{backend}")


@torch.library.custom_op("rmt_fast::gather_memory", mutates_args=())
def fused_gather(hidden: Tensor, memory: Tensor, gather_offsets: Tensor, backend: str) -> Tensor:
    """New memory ``[B, m, d]`` (hidden's dtype): ``hidden[b, g_b : g_b + m]``, or ``memory[b]`` where ``g_b < 0``.

    hidden: ``[B, N_prev, d]``; memory: ``[B, m, d]``, ``m >= 1``; gather_offsets: ``[B]`` int on their device.
    """
    return kernels(backend).gather_forward(hidden, memory, gather_offsets)


@fused_gather.register_fake
def _(hidden, memory, gather_offsets, backend):
    return hidden.new_empty(memory.shape)


@torch.library.custom_op("rmt_fast::gather_memory_backward", mutates_args=())
def fused_gather_backward(grad: Tensor, gather_offsets: Tensor, hidden_seq: int, hidden_dtype: torch.dtype,
                          memory_dtype: torch.dtype, backend: str) -> tuple[Tensor, Tensor]:
    """``grad [B, m, d]`` of the new memory -> ``(grad_hidden [B, N_prev, d], grad_memory [B, m, d])``."""
    return kernels(backend).gather_backward(grad, gather_offsets, hidden_seq, hidden_dtype, memory_dtype)


@fused_gather_backward.register_fake
def _(grad, gather_offsets, hidden_seq, hidden_dtype, memory_dtype, backend):
    b, m, d = grad.shape
    return grad.new_empty((b, hidden_seq, d), dtype=hidden_dtype), grad.new_empty((b, m, d), dtype=memory_dtype)


def _gather_setup(ctx, inputs, output):
    hidden, memory, gather_offsets, backend = inputs
    ctx.save_for_backward(gather_offsets)
    ctx.meta = (hidden.shape[1], hidden.dtype, memory.dtype, backend)


def _gather_backward(ctx, grad):
    (gather_offsets,) = ctx.saved_tensors
    grad_hidden, grad_memory = fused_gather_backward(grad, gather_offsets, *ctx.meta)
    return grad_hidden, grad_memory, None, None


fused_gather.register_autograd(_gather_backward, setup_context=_gather_setup)


class _EagerGather(torch.autograd.Function):
    """fused_gather's autograd without the custom-op dispatch (see rmt_fast/ops/memory_attention/__init__.py)."""

    @staticmethod
    def forward(ctx, hidden, memory, gather_offsets, backend):
        _gather_setup(ctx, (hidden, memory, gather_offsets, backend), None)
        return kernels(backend).gather_forward(hidden, memory, gather_offsets)

    @staticmethod
    def backward(ctx, grad):
        (gather_offsets,) = ctx.saved_tensors
        *meta, backend = ctx.meta
        grad_hidden, grad_memory = kernels(backend).gather_backward(grad, gather_offsets, *meta)
        return grad_hidden, grad_memory, None, None


def gather_memory(hidden: Tensor, memory: Tensor, gather_offsets: Tensor, backend: str) -> Tensor:
    """:func:`fused_gather`: the custom op under ``torch.compile``, eagerly the same kernels without its dispatch."""
    if torch.compiler.is_compiling():
        return fused_gather(hidden, memory, gather_offsets, backend)
    return _EagerGather.apply(hidden, memory, gather_offsets, backend)


@torch.library.custom_op("rmt_fast::place_memory", mutates_args=())
def fused_place(memory: Tensor, token_embeds: Tensor, read_offset: int, write_offsets: Tensor | None,
                backend: str) -> Tensor:
    """``token_embeds [B, N, d]`` with ``memory [B, m, d]`` (``m >= 1``) at ``[read_offset, read_offset + m)`` and at
    ``[w_b, w_b + m)`` for ``write_offsets [B]`` (or no write slots: None); token_embeds' dtype."""
    return kernels(backend).place_forward(memory, token_embeds, read_offset, write_offsets)


@fused_place.register_fake
def _(memory, token_embeds, read_offset, write_offsets, backend):
    return token_embeds.new_empty(token_embeds.shape)


@torch.library.custom_op("rmt_fast::place_memory_backward", mutates_args=())
def fused_place_backward(grad: Tensor, read_offset: int, write_offsets: Tensor | None, slots: int,
                         memory_dtype: torch.dtype, backend: str) -> tuple[Tensor, Tensor]:
    """``grad [B, N, d]`` of the embeddings -> ``(grad_memory [B, m, d], grad_token_embeds [B, N, d])``."""
    return kernels(backend).place_backward(grad, read_offset, write_offsets, slots, memory_dtype)


@fused_place_backward.register_fake
def _(grad, read_offset, write_offsets, slots, memory_dtype, backend):
    b, _, d = grad.shape
    return grad.new_empty((b, slots, d), dtype=memory_dtype), grad.new_empty(grad.shape)


def _place_setup(ctx, inputs, output):
    memory, token_embeds, read_offset, write_offsets, backend = inputs
    ctx.save_for_backward(write_offsets)
    ctx.meta = (read_offset, memory.shape[1], memory.dtype, backend)


def _place_backward(ctx, grad):
    (write_offsets,) = ctx.saved_tensors
    read_offset, slots, memory_dtype, backend = ctx.meta
    grad_memory, grad_token_embeds = fused_place_backward(grad, read_offset, write_offsets, slots, memory_dtype,
                                                          backend)
    return grad_memory, grad_token_embeds, None, None, None


fused_place.register_autograd(_place_backward, setup_context=_place_setup)


class _EagerPlace(torch.autograd.Function):
    """fused_place's autograd without the custom-op dispatch (see rmt_fast/ops/memory_attention/__init__.py)."""

    @staticmethod
    def forward(ctx, memory, token_embeds, read_offset, write_offsets, backend):
        _place_setup(ctx, (memory, token_embeds, read_offset, write_offsets, backend), None)
        return kernels(backend).place_forward(memory, token_embeds, read_offset, write_offsets)

    @staticmethod
    def backward(ctx, grad):
        (write_offsets,) = ctx.saved_tensors
        read_offset, slots, memory_dtype, backend = ctx.meta
        grad_memory, grad_token_embeds = kernels(backend).place_backward(grad, read_offset, write_offsets, slots,
                                                                         memory_dtype)
        return grad_memory, grad_token_embeds, None, None, None


def place_memory(memory: Tensor, token_embeds: Tensor, read_offset: int, write_offsets: Tensor | None,
                 backend: str) -> Tensor:
    """:func:`fused_place`: the custom op under ``torch.compile``, eagerly the same kernels without its dispatch."""
    if torch.compiler.is_compiling():
        return fused_place(memory, token_embeds, read_offset, write_offsets, backend)
    return _EagerPlace.apply(memory, token_embeds, read_offset, write_offsets, backend)


def segment_handoff(hidden: Tensor | None, memory: Tensor, gather_offsets: Tensor | None,
                    token_embeds: Tensor | None, read_offset: int, write_offsets: Tensor | None,
                    backend: str = "auto") -> tuple[Tensor, Tensor | None]:
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
    backend: one of :data:`rmt_fast.ops.BACKENDS` ("sdpa" runs the reference).

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
