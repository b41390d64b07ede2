"""Memory-token attention for plain layouts through PyTorch's fused ``scaled_dot_product_attention``.

A layout is plain (``SegmentLayout.is_plain``) when its mask is exactly causal or exactly full on every valid
query; then SDPA's flash / memory-efficient kernels (or its CPU math) compute the op in one call.
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
