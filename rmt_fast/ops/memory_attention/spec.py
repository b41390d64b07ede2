"""The specification of memory-token attention: the segment layout, its mask rule, the input checks.

``mask_rule`` is the one statement of which (query, key) pairs may attend. The reference builds its dense mask
from it (``SegmentLayout.allowed``) and the benchmarks hand it to FlexAttention; the fused kernels restate it
in their own languages (``_allowed`` in triton.py, ``RowMask::allowed`` in csrc/memory_attention.cu).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def mask_rule(i, j, valid, num_read, write_start, causal: bool, bidirectional: bool, num_cache: int = 0,
              cache_start=0):
    """May query ``i`` attend key ``j``? Index tensors (or ints) that broadcast against each other.

    valid: one past the row's last real position (``num_read + seq_len + num_write``); write_start: the row's
    first write slot (``num_read + seq_len``). Pairs with either index ``>= valid`` (padding) are never allowed;
    otherwise ``causal=False`` allows every pair (encoders), ``causal=True`` allows ``j <= i`` and, with
    ``bidirectional`` (the NeurIPS-2022 variant), every pair inside the read block ``[0, num_read)`` and every
    pair inside the write block ``[write_start, valid)``.

    With a short-term cache (``num_cache > 0``) the keys are ``[cache (num_cache) | segment]``: key ``j >=
    num_cache`` is segment position ``j - num_cache`` under the rule above, and the cache keys ``[cache_start,
    num_cache)`` (``cache_start = num_cache - cache_len``: the row's cached tokens end right before the segment)
    are visible to every valid query; cache keys before ``cache_start`` are padding. ``num_cache=0`` is the rule
    above, unchanged.
    """
    if num_cache:
        in_cache = (j < num_cache) & (j >= cache_start) & (i < valid)
        return in_cache | ((j >= num_cache) & mask_rule(i, j - num_cache, valid, num_read, write_start, causal,
                                                        bidirectional))
    ok = (i < valid) & (j < valid)
    if not causal:
        return ok
    rule = j <= i
    if bidirectional:
        rule = rule | ((i < num_read) & (j < num_read)) | ((i >= write_start) & (j >= write_start))
    return ok & rule


@dataclass(frozen=True, eq=False)
class SegmentLayout:
    """Where memory slots and tokens sit in one segment of every batch row.

    Row ``b`` holds ``num_read`` read slots, then ``seq_lens[b]`` tokens, then ``num_write`` write slots;
    everything at or past ``valid[b] = num_read + seq_lens[b] + num_write`` is padding. With a short-term cache,
    the keys start with ``num_cache`` more positions (the previous segment's last tokens, of which the last
    ``cache_lens[b]`` are real), visible to every valid query: keys ``[B, H, num_cache + N, D]`` against queries
    ``[B, H, N, D]``. Which pairs attend: :func:`mask_rule`.

    Padding contract of every backend: outputs at padding queries are unspecified (finite); outputs at valid
    queries never depend on padding keys or values, so gradients into padded k/v are zero whenever nothing
    downstream depends on the padding outputs (the reference, Triton and CUDA backends give zero regardless).

    Args:
        num_read: read (memory) slots at the start of every row, >= 0.
        num_write: write (memory) slots right after each row's last token, >= 0.
        seq_lens: int tensor ``[B]``, tokens per row (between the read and the write slots), >= 0.
        causal: decoder (True) or encoder (False) attention.
        memory_bidirectional: the NeurIPS-2022 mask variant (only meaningful with ``causal=True``).
        dense: a promise that every row fills all N positions (no padding); lets callers pick dense kernels.
        num_cache: cache keys in front of the segment's keys, >= 0 (0: no cache, the layout of plain RMT).
        cache_lens: int tensor ``[B]``, real cache keys per row (the last ones of the prefix), in
            ``[0, num_cache]``; None: all ``num_cache``.
    """

    num_read: int
    num_write: int
    seq_lens: torch.Tensor
    causal: bool
    memory_bidirectional: bool = False
    dense: bool = False
    num_cache: int = 0
    cache_lens: torch.Tensor | None = None

    def __post_init__(self):
        if not isinstance(self.num_read, int) or self.num_read < 0:
            raise ValueError(f"num_read must be an int >= 0, got {self.num_read!r}")
        if not isinstance(self.num_write, int) or self.num_write < 0:
            raise ValueError(f"num_write must be an int >= 0, got {self.num_write!r}")
        if not isinstance(self.seq_lens, torch.Tensor) or self.seq_lens.dim() != 1:
            raise TypeError("seq_lens must be a 1-D integer tensor [B]")
        if self.seq_lens.dtype.is_floating_point or self.seq_lens.dtype == torch.bool:
            raise TypeError(f"seq_lens must hold integers, got {self.seq_lens.dtype}")
        if isinstance(self.num_cache, bool) or not isinstance(self.num_cache, int) or self.num_cache < 0:
            raise ValueError(f"num_cache must be an int >= 0, got {self.num_cache!r}")
        if self.cache_lens is not None and (not isinstance(self.cache_lens, torch.Tensor)
                                            or self.cache_lens.shape != self.seq_lens.shape
                                            or self.cache_lens.dtype.is_floating_point
                                            or self.cache_lens.dtype == torch.bool):
            raise TypeError(f"cache_lens must be None or an integer tensor shaped like seq_lens "
                            f"{tuple(self.seq_lens.shape)}")

    @property
    def valid_lens(self) -> torch.Tensor:
        """``[B]`` number of non-padding positions per row."""
        return self.seq_lens + (self.num_read + self.num_write)

    @property
    def bidirectional(self) -> bool:
        """Whether the memory blocks attend bidirectionally (``memory_bidirectional`` under a causal mask)."""
        return self.causal and self.memory_bidirectional

    @property
    def is_plain(self) -> bool:
        """True when the mask is plain causal or plain full attention on every valid query.

        Causal without the bidirectional blocks: each row's padding comes after its last valid position, so
        valid queries never reach padding keys and the mask is exactly ``is_causal``. Non-causal: only when no
        row is padded (``dense``). Then PyTorch's fused SDPA kernels compute the op (the "sdpa" backend). A
        short-term cache makes no layout plain (the keys outnumber the queries).
        """
        if self.num_cache:
            return False
        return not self.memory_bidirectional if self.causal else self.dense

    @property
    def seq_lens_int32(self) -> torch.Tensor:
        """``seq_lens`` as a contiguous int32 tensor on its device, converted once per layout (the fused kernels
        read it; one layout serves every attention layer of a segment)."""
        cached = self.__dict__.get("_seq_lens_int32")
        if cached is None:
            s = self.seq_lens
            cached = s if s.dtype == torch.int32 and s.is_contiguous() else s.to(torch.int32).contiguous()
            object.__setattr__(self, "_seq_lens_int32", cached)
        return cached

    @property
    def cache_lens_int32(self) -> torch.Tensor:
        """``cache_lens`` as a contiguous int32 tensor on its device (where it is None: all ``num_cache``, on
        ``seq_lens``' device), made once per layout, like :attr:`seq_lens_int32` (the fused kernels read it)."""
        cached = self.__dict__.get("_cache_lens_int32")
        if cached is None:
            c = self.cache_lens
            if c is None:
                cached = torch.full(self.seq_lens.shape, self.num_cache, dtype=torch.int32, device=self.seq_lens.device)
            elif c.dtype == torch.int32 and c.is_contiguous():
                cached = c
            else:
                cached = c.to(torch.int32).contiguous()
            object.__setattr__(self, "_cache_lens_int32", cached)
        return cached

    @property
    def cache_start(self) -> torch.Tensor | int:
        """``[B, 1, 1]`` first real cache key of each row (``num_cache - cache_lens``; 0 without cache_lens)."""
        if self.cache_lens is None:
            return 0
        return (self.num_cache - self.cache_lens.to(self.seq_lens.device)).view(-1, 1, 1)

    def allowed(self, n: int) -> torch.Tensor:
        """The boolean mask ``[B, n, num_cache + n]`` (query, key) this layout defines (dense: for the reference)."""
        dev = self.seq_lens.device
        i = torch.arange(n, device=dev).view(1, n, 1)
        j = torch.arange(n + self.num_cache, device=dev).view(1, 1, -1)
        write_start = (self.seq_lens + self.num_read).view(-1, 1, 1)
        valid = write_start + self.num_write
        return mask_rule(i, j, valid, self.num_read, write_start, self.causal, self.bidirectional, self.num_cache,
                         self.cache_start)


def check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SegmentLayout) -> None:
    """Shape checks every backend makes (no device access: cheap enough for the hot path).

    q: ``[B, Hq, N, D]``; k, v: ``[B, Hkv, num_cache + N, D]`` with ``Hq % Hkv == 0``; ``layout.seq_lens``: ``[B]``.
    """
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D [B, H, N, D] with k and v of one shape; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    b, hq, n, d = q.shape
    bk, hk, nk, dk = k.shape
    if bk != b or nk != n + layout.num_cache or dk != d:
        raise ValueError(f"k/v shape {tuple(k.shape)} does not match q {tuple(q.shape)} in B, N (+ num_cache="
                         f"{layout.num_cache}) or D")
    if hk == 0 or hq % hk:
        raise ValueError(f"q heads ({hq}) must be a multiple of k/v heads ({hk})")
    if layout.seq_lens.shape[0] != b:
        raise ValueError(f"layout.seq_lens has {layout.seq_lens.shape[0]} rows, q has batch {b}")


def check_layout_fits(layout: SegmentLayout, n: int) -> None:
    """``valid_lens <= n``: reads the lengths back (a device sync), so only the reference checks it, and not while
    a CUDA graph is captured or torch.compile traces; the fused kernels clamp each row's valid length to N."""
    if torch.compiler.is_compiling() or (layout.seq_lens.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    need = int(layout.valid_lens.max()) if layout.seq_lens.numel() else 0
    if need > n:
        raise ValueError(f"layout needs {need} positions, q has only {n}")
