"""The segment handoff on the CUDA extension (``csrc/segment_handoff.cu``): one memory-bound kernel per half and
direction, 16-byte vector accesses where alignment allows. fp32 / fp16 / bf16 in any mix.

No device-side checks (no syncs): a gathered row past the end of ``hidden`` reads as NaN, placed slots outside
``[0, N)`` are skipped.
"""
from __future__ import annotations

import torch

from ..cuda import extension


def gather_forward(hidden: torch.Tensor, memory: torch.Tensor, gather_offsets: torch.Tensor) -> torch.Tensor:
    """hidden ``[B, N_prev, d]``, memory ``[B, m, d]``, gather_offsets ``[B]`` int -> ``[B, m, d]`` (hidden's dtype)."""
    return extension("segment_handoff").gather_memory_fwd(hidden, memory, gather_offsets)


def gather_backward(grad: torch.Tensor, gather_offsets: torch.Tensor, hidden_seq: int, hidden_dtype: torch.dtype,
                    memory_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """grad ``[B, m, d]`` of the new memory -> (grad_hidden ``[B, N_prev, d]``, grad_memory ``[B, m, d]``)."""
    grad_hidden, grad_memory = extension("segment_handoff").gather_memory_bwd(grad, gather_offsets, hidden_seq,
                                                                              hidden_dtype, memory_dtype)
    return grad_hidden, grad_memory


def place_forward(memory: torch.Tensor, token_embeds: torch.Tensor, read_offset: int,
                  write_offsets: torch.Tensor | None) -> torch.Tensor:
    """memory ``[B, m, d]``, token_embeds ``[B, N, d]`` -> ``[B, N, d]`` (token_embeds' dtype), memory at the slots."""
    return extension("segment_handoff").place_memory_fwd(memory, token_embeds, read_offset, write_offsets)


def place_backward(grad: torch.Tensor, read_offset: int, write_offsets: torch.Tensor | None, slots: int,
                   memory_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """grad ``[B, N, d]`` of the embeddings -> (grad_memory ``[B, m, d]``, grad_token_embeds ``[B, N, d]``)."""
    grad_memory, grad_token_embeds = extension("segment_handoff").place_memory_bwd(grad, read_offset, write_offsets,
                                                                                   slots, memory_dtype)
    return grad_memory, grad_token_embeds
