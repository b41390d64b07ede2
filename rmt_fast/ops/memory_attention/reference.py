"""Memory-token attention in plain PyTorch: the dense masked softmax that the fused backends are tested against."""
from __future__ import annotations

import torch

from .spec import SegmentLayout, check_attention_inputs, check_layout_fits


def memory_attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SegmentLayout, scale: float | None = None
) -> torch.Tensor:
    """Softmax attention under the RMT segment mask, in fp32 math (fp64 inputs stay fp64, for gradcheck).

    q: ``[B, Hq, N, D]``; k, v: ``[B, Hkv, num_cache + N, D]`` with ``Hq % Hkv == 0`` (grouped-query attention;
    ``layout.num_cache`` short-term cache keys first), any floating dtypes. Returns ``[B, Hq, N, D]`` in q's dtype; padding queries (no allowed key) get zeros here, but callers
    may rely only on valid positions (see :class:`SegmentLayout`).
    """
    check_attention_inputs(q, k, v, layout)
    b, hq, n, d = q.shape
    check_layout_fits(layout, n)
    groups = hq // k.shape[1]
    scale = d ** -0.5 if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf, vf = q.to(acc), k.to(acc), v.to(acc)
    if groups > 1:
        kf = kf.repeat_interleave(groups, dim=1)
        vf = vf.repeat_interleave(groups, dim=1)
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    allowed = layout.allowed(n).unsqueeze(1)  # [B, 1, N, num_cache + N]
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.where(allowed, probs, torch.zeros((), dtype=acc, device=q.device))  # keyless rows: 0, not NaN
    return torch.matmul(probs, vf).to(q.dtype)
