"""Fused linear + cross-entropy for the decoder loss: ``[N, V]`` fp32 logits never exist when only the loss is needed.

Backends: "liger" (liger-kernel's Triton fused linear cross-entropy; CUDA, when ``liger_kernel`` imports: install
``rmt_fast[gpu]``), "chunked" (PyTorch over row chunks, any device), "reference" (plain logits + cross-entropy, the
specification). "auto": liger on CUDA when available, else chunked. All return the fp32 summed loss.
"""
from __future__ import annotations

import functools

import torch

from .chunked import linear_cross_entropy_chunked
from .reference import linear_cross_entropy_ref

LCE_BACKENDS = ("auto", "liger", "chunked", "reference")


@functools.lru_cache(maxsize=None)
def liger_available() -> bool:
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy  # noqa: F401
    except Exception:  # not installed, or broken against this torch/triton
        return False
    return True


def _liger(hidden, weight, bias, targets, ignore_index):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return liger_fused_linear_cross_entropy(hidden, weight, targets, bias=bias, ignore_index=ignore_index,
                                            reduction="sum").float()


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, ignore_index: int = -100, backend: str = "auto") -> torch.Tensor:
    """Summed cross-entropy of the logits ``hidden @ weight.T + bias`` against ``targets``, as an fp32 scalar.

    hidden: ``[N, d]``; weight: ``[V, d]``; bias: ``[V]`` or None; targets: ``[N]`` int, ``ignore_index`` skipped.
    Gradients flow to hidden, weight and bias.
    """
    if backend not in LCE_BACKENDS:
        raise ValueError(f"backend must be one of {LCE_BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "liger" if hidden.is_cuda and liger_available() and not _capturing() else "chunked"
    if backend == "liger":
        if not liger_available():
            raise ValueError("backend='liger' requested but liger_kernel does not import (pip install liger-kernel)")
        return _liger(hidden, weight, bias, targets, ignore_index)
    if backend == "chunked":
        return linear_cross_entropy_chunked(hidden, weight, bias, targets, ignore_index)
    return linear_cross_entropy_ref(hidden, weight, bias, targets, ignore_index)


def _capturing() -> bool:
    """liger reads counts back to the host, which a CUDA graph capture cannot do: use the chunked path there."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
