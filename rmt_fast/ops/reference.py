"""Plain-PyTorch reference of every rmt_fast op: the specification the fast paths are tested against.

All math is done in fp32 (inputs of any floating dtype are upcast; outputs are cast back).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class SegmentLayout:
    """Where memory slots and tokens sit in one segment of every batch row.

    Row ``b`` of a segment holds ``num_read`` read slots, then ``seq_lens[b]`` tokens, then ``num_write``
    write slots; everything at or past ``valid[b] = num_read + seq_lens[b] + num_write`` is padding.

    Attention between query ``i`` and key ``j`` of row ``b`` (both ``< valid[b]``) is allowed when
    ``causal=False``: always (encoders); ``causal=True``: ``j <= i``, plus, with ``memory_bidirectional``,
    pairs inside the read block ``[0, num_read)`` and pairs inside the write block
    ``[num_read + seq_lens[b], valid[b])`` (the NeurIPS-2022 variant).

    Args:
        num_read: read (memory) slots at the start of every row, >= 0.
        num_write: write (memory) slots right after each row's last token, >= 0.
        seq_lens: int tensor ``[B]``, tokens per row (between the read and the write slots), >= 0.
        causal: decoder (True) or encoder (False) attention.
        memory_bidirectional: the NeurIPS-2022 mask variant (only meaningful with ``causal=True``).
        dense: a promise that every row fills all N positions (no padding); lets callers pick dense kernels.
    """

    num_read: int
    num_write: int
    seq_lens: torch.Tensor
    causal: bool
    memory_bidirectional: bool = False
    dense: bool = False

    def __post_init__(self):
        if not isinstance(self.num_read, int) or self.num_read < 0:
            raise ValueError(f"num_read must be an int >= 0, got {self.num_read!r}")
        if not isinstance(self.num_write, int) or self.num_write < 0:
            raise ValueError(f"num_write must be an int >= 0, got {self.num_write!r}")
        if not isinstance(self.seq_lens, torch.Tensor) or self.seq_lens.dim() != 1:
            raise TypeError("seq_lens must be a 1-D integer tensor [B]")
        if self.seq_lens.dtype.is_floating_point:
            raise TypeError(f"seq_lens must hold integers, got {self.seq_lens.dtype}")

    @property
    def valid_lens(self) -> torch.Tensor:
        """``[B]`` number of non-padding positions per row."""
        return self.seq_lens + (self.num_read + self.num_write)

    def allowed(self, n: int) -> torch.Tensor:
        """The boolean mask ``[B, n, n]`` (query, key) this layout defines (the reference, not a fast path)."""
        dev = self.seq_lens.device
        i = torch.arange(n, device=dev).view(1, n, 1)
        j = torch.arange(n, device=dev).view(1, 1, n)
        valid = self.valid_lens.view(-1, 1, 1)
        ok = (i < valid) & (j < valid)
        if not self.causal:
            return ok
        rule = j <= i
        if self.memory_bidirectional:
            r = self.num_read
            write_start = (self.seq_lens + r).view(-1, 1, 1)
            rule = rule | ((i < r) & (j < r)) | ((i >= write_start) & (j >= write_start))
        return ok & rule


def check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SegmentLayout,
                           check_lengths: bool = True) -> None:
    """Shape checks shared by every backend. ``check_lengths`` also checks ``valid_lens <= N``, which reads the
    lengths back (a device sync); the fused kernels skip it and clamp each row's valid length to N instead."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D [B, H, N, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    b, hq, n, d = q.shape
    if k.shape[0] != b or k.shape[2] != n or k.shape[3] != d:
        raise ValueError(f"k/v shape {tuple(k.shape)} does not match q {tuple(q.shape)} in B, N or D")
    if k.shape[1] == 0 or hq % k.shape[1] != 0:
        raise ValueError(f"q heads ({hq}) must be a multiple of k/v heads ({k.shape[1]})")
    if layout.seq_lens.shape[0] != b:
        raise ValueError(f"layout.seq_lens has {layout.seq_lens.shape[0]} rows, q has batch {b}")
    if not check_lengths or (layout.seq_lens.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    if int(layout.valid_lens.max()) > n:
        raise ValueError(f"layout needs {int(layout.valid_lens.max())} positions, q has only {n}")


def memory_attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SegmentLayout, scale: float | None = None
) -> torch.Tensor:
    """Softmax attention under the RMT segment mask.

    q: ``[B, Hq, N, D]``; k, v: ``[B, Hkv, N, D]`` with ``Hq % Hkv == 0`` (grouped-query attention).
    Returns ``[B, Hq, N, D]`` in q's dtype. Queries with no allowed key (padding) get zeros.
    """
    check_attention_inputs(q, k, v, layout)
    b, hq, n, d = q.shape
    groups = hq // k.shape[1]
    scale = d ** -0.5 if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32  # fp32 math (fp64 kept for gradcheck)
    qf, kf, vf = q.to(acc), k.to(acc), v.to(acc)
    if groups > 1:
        kf = kf.repeat_interleave(groups, dim=1)
        vf = vf.repeat_interleave(groups, dim=1)
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    allowed = layout.allowed(n).unsqueeze(1)  # [B, 1, N, N]
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.where(allowed, probs, torch.zeros((), device=q.device))  # rows with no key: 0, not NaN
    return torch.matmul(probs, vf).to(q.dtype)


def segment_handoff_ref(
    hidden: torch.Tensor | None,
    memory: torch.Tensor,
    gather_offsets: torch.Tensor | None,
    token_embeds: torch.Tensor | None,
    read_offset: int,
    write_offsets: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One memory handoff between segments: read the new memory, place it into the next segment's input.

    hidden: ``[B, N_prev, d]`` last-layer states of the previous segment, or None (first segment: no read).
    memory: ``[B, m, d]`` the memory that entered the previous segment.
    gather_offsets: ``[B]`` int; row b's new memory is ``hidden[b, gather_offsets[b] : gather_offsets[b] + m]``;
        a negative offset means the row had no segment and keeps ``memory[b]``.
    token_embeds: ``[B, N, d]`` the next segment's input embeddings with anything at the memory slots, or None
        (last segment: only the read).
    read_offset: first read slot of every row (0 for decoders, 1 for encoders after [CLS]).
    write_offsets: ``[B]`` int, first write slot of each row in the next segment, or None (no write slots).

    Returns ``(new_memory [B, m, d], inputs_embeds [B, N, d])``: the token embeddings with ``new_memory`` written
    at ``[read_offset, read_offset + m)`` and at ``[write_offsets[b], write_offsets[b] + m)``. Gradients flow to
    ``hidden`` (gathered rows), ``memory`` (kept rows) and ``token_embeds`` (positions not overwritten).
    """
    b, m, d = memory.shape
    if hidden is not None and m > 0:
        slot = torch.arange(m, device=hidden.device)
        pos = gather_offsets.clamp(min=0).view(b, 1) + slot
        gathered = hidden.gather(1, pos.unsqueeze(-1).expand(b, m, d))
        keep = (gather_offsets < 0).view(b, 1, 1)
        memory = torch.where(keep, memory.to(gathered.dtype), gathered)
    embeds = token_embeds
    if m == 0 or embeds is None:
        return memory, embeds
    mem = memory.to(token_embeds.dtype)
    slot = torch.arange(m, device=embeds.device).view(1, m)
    pos = (slot + read_offset).expand(b, m)
    if write_offsets is not None:
        pos = torch.cat([pos, write_offsets.view(b, 1) + slot], 1)
        mem = torch.cat([mem, mem], 1)
    embeds = embeds.scatter(1, pos.unsqueeze(-1).expand(-1, -1, d), mem)
    return memory, embeds
