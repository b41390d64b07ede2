"""Plain-PyTorch linear + cross-entropy: the specification of :func:`rmt_fast.ops.linear_cross_entropy`."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_cross_entropy_ref(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Summed cross-entropy of ``hidden @ weight.T + bias`` against ``targets``.

    hidden: ``[N, d]``; weight: ``[V, d]``; bias: ``[V]`` or None; targets: ``[N]`` int (``ignore_index``: skipped).
    The logits are formed in hidden's dtype (as the model's LM head does) and the softmax is taken in fp32.
    Returns the fp32 scalar sum over the targets that are not ignored.
    """
    logits = F.linear(hidden, weight, bias)
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction="sum")
