"""The short-term cache: each segment also attends, in every layer, the keys and values of the previous segment's
last ``C`` tokens (Transformer-XL style, beside the memory). Design and position rules: docs/short_term_cache.md.

A segment call gets a :class:`SegmentCache` (through transformers' attention interface, see
:mod:`rmt_fast.integrations.hf`); every attention layer hands it its keys and values and gets back ``[cache |
segment]``, and the segment's own last tokens are recorded for the next segment (:meth:`SegmentCache.result`).
Index arithmetic only, no host synchronisation.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import torch

from .ops import SegmentLayout

# (keys [B, H, C, D], shift [B]) -> the keys moved by ``shift`` positions (rotary families; None: absolute positions)
KeyShift = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class ShortTermCache(NamedTuple):
    """What one segment leaves to the next: per attention layer ``keys[l]``, ``values[l]`` ``[B, Hkv, C, D]`` of the
    segment's last ``C`` token positions, and ``lens`` ``[B]``: how many of them are real tokens (the last
    ``lens[b]`` of the ``C``; a row with fewer tokens than ``C`` leaves fewer; a row with none in the segment keeps
    the cache it had)."""

    keys: tuple
    values: tuple
    lens: torch.Tensor

    def detach(self) -> ShortTermCache:
        return ShortTermCache(tuple(k.detach() for k in self.keys), tuple(v.detach() for v in self.values),
                              self.lens)

    def clone(self) -> ShortTermCache:
        """A copy with its own storage (a replayed CUDA graph overwrites its static cache buffers)."""
        return ShortTermCache(tuple(k.clone() for k in self.keys), tuple(v.clone() for v in self.values),
                              self.lens.clone())


def shift_rotary_keys(rotary_emb: torch.nn.Module, keys: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate rotary-embedded ``keys`` ``[B, H, C, D]`` by ``shift[b]`` more positions (fp32 angles), as the
    backbone's ``rotary_emb`` rotates (rotate-half pairs over the first ``2 * len(inv_freq)`` dims, the rest
    passed through). A pure rotation: a scaled rotary (``attention_scaling``) keeps its scale."""
    inv_freq = rotary_emb.inv_freq.to(device=keys.device, dtype=torch.float32)
    half = inv_freq.numel()
    angle = shift.to(torch.float32).view(-1, 1, 1, 1) * inv_freq  # [B, 1, 1, half]
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = keys[..., :half].float(), keys[..., half:2 * half].float()
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(keys.dtype)
    return torch.cat([rotated, keys[..., 2 * half:]], -1) if keys.shape[-1] > 2 * half else rotated


class SegmentCache:
    """One segment's short-term cache: ``past`` (None for a first segment: ``C`` empty entries), ``size`` ``C`` and
    how keys move between segments (``shift_keys``, None for absolute positions)."""

    def __init__(self, past: ShortTermCache | None, size: int, shift_keys: KeyShift | None):
        self.past, self.size, self.shift_keys = past, size, shift_keys
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        # set by the first layer (:meth:`_plan`), the same for every layer
        self.lens: torch.Tensor | None = None
        self.rows: torch.Tensor | None = None
        self.shift: torch.Tensor | None = None

    def layout(self, layout: SegmentLayout) -> SegmentLayout:
        """``layout`` with the cache as its key prefix (``num_cache = C``, the past's real lengths)."""
        lens = self.past.lens if self.past is not None else torch.zeros_like(layout.seq_lens)
        return dataclasses.replace(layout, num_cache=self.size, cache_lens=lens)

    def extend(self, layer: int, key: torch.Tensor, value: torch.Tensor, layout: SegmentLayout):
        """Attention layer ``layer``'s keys/values ``[B, Hkv, N, D]`` -> ``[cache | segment]`` ``[B, Hkv, C + N, D]``;
        records the segment's last ``C`` token positions (``layout``: the segment's read slots and tokens) for the
        next segment, their keys moved so that they end right before its position 0 (rotary families)."""
        b, h, _, d = key.shape
        c = self.size
        if self.rows is None:  # once per segment: every layer records the same positions
            self._plan(layout, key.device)
        if self.past is None:
            past_k, past_v = key.new_zeros(b, h, c, d), value.new_zeros(b, h, c, d)
        else:
            past_k, past_v = self.past.keys[layer], self.past.values[layer]
        full_k, full_v = torch.cat([past_k, key], 2), torch.cat([past_v, value], 2)
        idx = self.rows.expand(b, h, c, d)
        new_k, new_v = full_k.gather(2, idx), full_v.gather(2, idx)
        if self.shift_keys is not None:
            new_k = self.shift_keys(new_k, self.shift)
        self.keys[layer], self.values[layer] = new_k, new_v
        return full_k, full_v

    def _plan(self, layout: SegmentLayout, device) -> None:
        """What every layer of this segment records: ``rows`` ``[B, 1, C, 1]``, positions in ``[cache | segment]``
        (the segment's last ``C`` token positions; a row with no token in this segment -- a shorter row's idle
        segments -- keeps its cache, as it keeps its memory: positions are per segment, so the kept keys still end
        right before the next segment), ``shift`` ``[B]`` (how far the recorded keys move: to end right before the
        next segment's position 0; 0 for kept ones) and ``lens``."""
        c = self.size
        seq_lens = layout.seq_lens.to(device)
        end = layout.num_read + seq_lens  # one past each row's last token
        rows = c + (end.view(-1, 1) - c + torch.arange(c, device=device)).clamp(min=0)
        self.shift = -end
        if self.past is None:
            self.lens = layout.seq_lens.clamp(max=c)
        else:
            idle = seq_lens == 0
            rows = torch.where(idle.view(-1, 1), torch.arange(c, device=device), rows)
            self.shift = torch.where(idle, 0, self.shift)
            self.lens = torch.where(layout.seq_lens == 0, self.past.lens, layout.seq_lens.clamp(max=c))
        self.rows = rows.view(-1, 1, c, 1)

    def result(self) -> ShortTermCache:
        """The cache the next segment reads (every layer's recorded keys and values)."""
        layers = sorted(self.keys)
        return ShortTermCache(tuple(self.keys[i] for i in layers), tuple(self.values[i] for i in layers), self.lens)


class DecodingPrefix:
    """The short-term cache during token-by-token decoding inside a segment (:mod:`rmt_fast.generation`): the
    segment's prefill saw ``[cache | memory | tokens]``; each decoding step's query sees the same cache before the
    KV cache of the segment, masked where a row has fewer than ``C`` real entries."""

    def __init__(self, past: ShortTermCache):
        self.past = past

    def prepend(self, layer: int, key: torch.Tensor, value: torch.Tensor):
        """``key``/``value`` ``[B, Hkv, S, D]`` (the segment's KV cache) -> ``[cache | segment]`` and the boolean
        mask ``[B, 1, 1, C + S]`` of the keys a decoding step may attend."""
        past_k, past_v = self.past.keys[layer], self.past.values[layer]
        c = past_k.shape[2]
        real = torch.arange(c, device=key.device).view(1, -1) >= (c - self.past.lens.to(key.device)).view(-1, 1)
        mask = torch.cat([real, real.new_ones(key.shape[0], key.shape[2])], 1)
        return torch.cat([past_k, key], 2), torch.cat([past_v, value], 2), mask[:, None, None, :]
