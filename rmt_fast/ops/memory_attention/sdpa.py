"""Memory-token attention through PyTorch's fused ``scaled_dot_product_attention``.

A layout is plain (``SegmentLayout.is_plain``) when its mask is exactly causal or exactly full on every valid
query; then SDPA's flash / memory-efficient kernels (or its CPU math) compute the op in one call
(:func:`memory_attention_sdpa`). Any other layout, the short-term cache's included, can go to SDPA with the
layout's boolean mask (:func:`memory_attention_sdpa_masked`: its memory-efficient kernel, no score matrix kept).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .spec import SegmentLayout


def memory_attention_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SegmentLayout, scale: float | None = None
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` with ``is_causal=layout.causal``; ``layout`` must be plain.

    q: ``[B, Hq, N, D]``; k, v: ``[B, Hkv, N, D]``, ``Hq % Hkv == 0``. Returns ``[B, Hq, N, D]`` in q's dtype.
    Padding queries of a causal layout attend to earlier padding keys: their outputs are finite and unused, and
    gradients reach padded k/v only through them.
    """
    return F.scaled_dot_product_attention(q, k, v, is_causal=layout.causal, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


def memory_attention_sdpa_masked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SegmentLayout, scale: float | None = None
) -> torch.Tensor:
    """Any layout through ``F.scaled_dot_product_attention`` with ``layout.allowed`` as a boolean mask.

    q: ``[B, Hq, N, D]``; k, v: ``[B, Hkv, num_cache + N, D]``. Returns ``[B, Hq, N, D]`` in q's dtype. A padding
    query with no allowed key is given its own position as its one key, so that its (unused) output stays finite
    and no NaN reaches a gradient; valid queries see exactly the layout's keys.
    """
    n = q.shape[2]
    allowed = layout.allowed(n).to(q.device)  # [B, N, num_cache + N]
    keyless = ~allowed.any(-1, keepdim=True)
    own = (torch.arange(allowed.shape[-1], device=q.device).view(1, 1, -1)
           == (layout.num_cache + torch.arange(n, device=q.device)).view(1, -1, 1))
    allowed = allowed | (keyless & own)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed.unsqueeze(1), scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])
