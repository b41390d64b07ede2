"""Everything transformers-specific about attention: the "rmt_fast" function of transformers' AttentionInterface.

transformers picks a model's attention function by name from ``config._attn_implementation`` at call time, and
passes extra keyword arguments of the model's forward down to it. An RMT segment therefore runs the backbone's
own layers with two changes, both scoped to the segment call (:func:`segment_call`):

- the implementation name is "rmt_fast" while the call runs (and restored afterwards, so the bare model is
  untouched);
- the segment's :class:`~rmt_fast.ops.SegmentLayout` and backend travel as the keyword arguments ``rmt_layout``
  and ``rmt_backend`` down to :func:`rmt_attention_forward`, which calls
  :func:`rmt_fast.ops.memory_attention.memory_attention`;
  with a short-term cache, the segment's :class:`~rmt_fast.short_term_cache.SegmentCache` travels as ``rmt_cache``
  and puts each layer's cached keys/values (found by the attention module's ``layer_idx``) in front of its own.

transformers builds no mask tensor for an implementation without a registered mask function, so nothing is
materialised; the mask is the layout's rule. The function is registered once, when this module is imported.
"""
from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from ..fusion import segment_active
from ..ops.memory_attention import SegmentLayout, memory_attention

ATTN_NAME = "rmt_fast"
_warned_dropout = False


def rmt_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                          is_causal=None, rmt_layout: SegmentLayout | None = None, rmt_backend: str = "auto",
                          rmt_cache=None, **kwargs):
    """AttentionInterface-compatible: query ``[B, Hq, Nq, D]``, key/value ``[B, Hkv, Nk, D]`` ->
    ``([B, Nq, Hq, D], None)``.

    With ``rmt_layout``: a whole segment under the RMT mask. Without it and one query (a decoding step against
    a KV cache, see :mod:`rmt_fast.generation`): the new token sees every cached position.
    """
    global _warned_dropout
    if dropout and not _warned_dropout:
        _warned_dropout = True
        warnings.warn("rmt_fast: attention-probability dropout is not applied by memory_attention "
                      "(hidden-state dropout still is)", RuntimeWarning, stacklevel=2)
    if rmt_cache is not None and rmt_layout is not None:
        key, value = rmt_cache.extend(module.layer_idx, key, value, rmt_layout)
    if rmt_layout is not None and query.shape[2] + rmt_layout.num_cache == key.shape[2]:
        out = memory_attention(query, key, value, rmt_layout, scale=scaling, backend=rmt_backend)
    elif rmt_layout is None and query.shape[2] == 1:
        mask = None
        if rmt_cache is not None:  # a DecodingPrefix: the short-term cache before the segment's KV cache
            key, value, mask = rmt_cache.prepend(module.layer_idx, key, value)
        groups = query.shape[1] // key.shape[1]
        if groups > 1:
            key = key.repeat_interleave(groups, dim=1)
            value = value.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    else:
        raise RuntimeError("rmt_fast attention was called outside an RMT segment (no rmt_layout was passed)")
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTN_NAME, rmt_attention_forward)


def attention_kwargs(layout: SegmentLayout | None, backend: str) -> dict:
    """The keyword arguments that carry a segment's layout from the backbone's forward to its attention."""
    return {"rmt_layout": layout, "rmt_backend": backend}


@contextlib.contextmanager
def segment_call(model: torch.nn.Module, fused: bool = False):
    """Route ``model``'s attention through rmt_fast for the duration of the block (restored afterwards); with
    ``fused``, let the block kernels :func:`rmt_fast.fusion.install` put in the model run."""
    cfg = model.config
    before = cfg._attn_implementation
    cfg._attn_implementation = ATTN_NAME
    try:
        with segment_active(fused):
            yield
    finally:
        cfg._attn_implementation = before


def recompute_in_segment(checkpoint, config):
    """Wrap a layer's activation-checkpoint function so that its recompute, which runs in backward after
    :func:`segment_call` has restored the backbone's own attention, runs under the implementation the layer's
    forward ran with (the segment's layout travels in the checkpointed keyword arguments)."""

    def checkpoint_in_segment(function, *args, **kwargs):
        impl = config._attn_implementation

        def replay(*a, **k):
            before = config._attn_implementation
            config._attn_implementation = impl
            try:
                return function(*a, **k)
            finally:
                config._attn_implementation = before

        return checkpoint(replay, *args, **kwargs)

    return checkpoint_in_segment
