"""transformers integration: the "rmt_fast" attention function, registered with AttentionInterface.

While an RMT forward runs, the backbone's config names "rmt_fast" as its attention implementation and the
current :class:`~rmt_fast.ops.SegmentLayout` is held here, so the model's own attention layers call
:func:`rmt_fast.ops.memory_attention` with the right mask and no other change to the model. transformers builds
no mask tensor for this implementation (it has no mask function registered), so nothing is materialised.
"""
from __future__ import annotations

import contextlib
import threading
import warnings

import torch
import torch.nn.functional as F

from ..ops import SegmentLayout, memory_attention

ATTN_NAME = "rmt_fast"
_state = threading.local()
_warned_dropout = False


def current_layout() -> tuple[SegmentLayout | None, str]:
    return getattr(_state, "layout", None), getattr(_state, "backend", "auto")


def rmt_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                          is_causal=None, **kwargs):
    """AttentionInterface-compatible: query [B, Hq, Nq, D], key/value [B, Hkv, Nk, D] -> ([B, Nq, Hq, D], None)."""
    global _warned_dropout
    layout, backend = current_layout()
    if dropout and not _warned_dropout:
        _warned_dropout = True
        warnings.warn("rmt_fast: attention-probability dropout is not applied by memory_attention "
                      "(hidden-state dropout still is)", RuntimeWarning, stacklevel=2)
    if layout is not None and query.shape[2] == key.shape[2]:
        if backend == "auto" and _is_plain(layout):
            out = F.scaled_dot_product_attention(query, key, value, is_causal=layout.causal, scale=scaling,
                                                 enable_gqa=query.shape[1] != key.shape[1])
        else:
            out = memory_attention(query, key, value, layout, scale=scaling, backend=backend)
    elif query.shape[2] == 1:
        # one decoding step against a KV cache: the new token sees every cached position
        groups = query.shape[1] // key.shape[1]
        if groups > 1:
            key = key.repeat_interleave(groups, dim=1)
            value = value.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(query, key, value, scale=scaling)
    else:
        raise RuntimeError("rmt_fast attention was called outside an RMT segment (no layout is active)")
    return out.transpose(1, 2).contiguous(), None


def _is_plain(layout: SegmentLayout) -> bool:
    """True when, inside the recurrence, the layout's mask is plain causal or plain full attention.

    Decoders put each row's write slots right after its last token and the padding after them, so valid
    queries never reach padding under a causal mask, and nothing reads the padding's outputs: with
    ``memory_bidirectional=False`` the mask is exactly ``is_causal``. Encoders are plain when no row is
    padded. Then SDPA's fused (flash) kernels give the same results with fewer launches.
    """
    if layout.causal:
        return not layout.memory_bidirectional
    return layout.dense


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, rmt_attention_forward)


@contextlib.contextmanager
def rmt_attention(model: torch.nn.Module, backend: str = "auto"):
    """Route ``model``'s attention through rmt_fast for the duration of the block (restored afterwards)."""
    cfg = model.config
    before = cfg._attn_implementation
    prev_backend = getattr(_state, "backend", "auto")
    cfg._attn_implementation = ATTN_NAME
    _state.backend = backend
    try:
        yield
    finally:
        cfg._attn_implementation = before
        _state.backend = prev_backend


@contextlib.contextmanager
def segment_layout(layout: SegmentLayout | None):
    """Make ``layout`` the mask of every rmt_fast attention call inside the block."""
    prev = getattr(_state, "layout", None)
    _state.layout = layout
    try:
        yield
    finally:
        _state.layout = prev
