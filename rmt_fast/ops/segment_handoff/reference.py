"""The segment handoff in plain PyTorch: the specification that the fused backends are tested against.

Between two segments the recurrence gathers each row's new memory from the last hidden states
(:func:`gather_memory_ref`) and places a memory into the next segment's input embeddings
(:func:`place_memory_ref`); :func:`segment_handoff_ref` is the two in one call.
"""
from __future__ import annotations

import torch


def gather_memory_ref(hidden: torch.Tensor, memory: torch.Tensor, gather_offsets: torch.Tensor) -> torch.Tensor:
    """Each row's new memory: ``hidden[b, g_b : g_b + m]``, or ``memory[b]`` where ``g_b < 0`` (no segment).

    hidden: ``[B, N_prev, d]``; memory: ``[B, m, d]``; gather_offsets: ``[B]`` int, ``g_b + m <= N_prev``.
    Returns ``[B, m, d]`` in hidden's dtype. Gradients flow to the gathered rows of ``hidden`` and the kept
    rows of ``memory``.
    """
    b, m, d = memory.shape
    pos = gather_offsets.clamp(min=0).view(b, 1) + torch.arange(m, device=hidden.device)
    gathered = hidden.gather(1, pos.unsqueeze(-1).expand(b, m, d))
    keep = (gather_offsets < 0).view(b, 1, 1)
    return torch.where(keep, memory.to(gathered.dtype), gathered)


def place_memory_ref(memory: torch.Tensor, token_embeds: torch.Tensor, read_offset: int,
                     write_offsets: torch.Tensor | None) -> torch.Tensor:
    """``token_embeds`` with ``memory`` written at every row's read slots and write slots.

    memory: ``[B, m, d]``; token_embeds: ``[B, N, d]``; read_offset: first read slot of every row
    (``read_offset + m <= N``); write_offsets: ``[B]`` int, first write slot of each row
    (``w_b + m <= N``), or None (no write slots). The read block and a row's write block must not overlap.
    Returns ``[B, N, d]`` in token_embeds' dtype. Gradients flow to ``memory`` (summed over both blocks) and to
    ``token_embeds`` at the positions not overwritten.
    """
    b, m, d = memory.shape
    mem = memory.to(token_embeds.dtype)
    slot = torch.arange(m, device=token_embeds.device).view(1, m)
    pos = (slot + read_offset).expand(b, m)
    if write_offsets is not None:
        pos = torch.cat([pos, write_offsets.view(b, 1) + slot], 1)
        mem = torch.cat([mem, mem], 1)
    return token_embeds.scatter(1, pos.unsqueeze(-1).expand(-1, -1, d), mem)


def segment_handoff_ref(
    hidden: torch.Tensor | None,
    memory: torch.Tensor,
    gather_offsets: torch.Tensor | None,
    token_embeds: torch.Tensor | None,
    read_offset: int,
    write_offsets: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One memory handoff between segments: gather the new memory, place it into the next segment's input.

    hidden: ``[B, N_prev, d]`` last-layer states of the previous segment, or None (no gather: the memory is
        ``memory`` itself).
    memory: ``[B, m, d]`` the memory that entered the previous segment.
    gather_offsets: ``[B]`` int, see :func:`gather_memory_ref` (unused without ``hidden``).
    token_embeds: ``[B, N, d]`` the next segment's input embeddings (anything at the memory slots), or None
        (no placement).
    read_offset, write_offsets: where the memory goes, see :func:`place_memory_ref`.

    Returns ``(new_memory [B, m, d], inputs_embeds [B, N, d] or None)``.
    """
    if hidden is not None and memory.shape[1] > 0:
        memory = gather_memory_ref(hidden, memory, gather_offsets)
    if token_embeds is None or memory.shape[1] == 0:
        return memory, token_embeds
    return memory, place_memory_ref(memory, token_embeds, read_offset, write_offsets)
