"""Fused linear + cross-entropy for the decoder loss: ``[N, V]`` fp32 logits never exist when only the loss is needed.

Backends: "triton" (cuBLAS logits in the model's dtype + a Triton row kernel for the loss and its gradient; CUDA,
or CPU under ``TRITON_INTERPRET=1``), "chunked" (PyTorch over row chunks, any device), "liger" (liger-kernel's
fused linear cross-entropy, when ``liger_kernel`` imports), "reference" (plain logits + cross-entropy, the
specification). "auto": triton on CUDA, else chunked. All return the fp32 summed loss. liger is not the default: on an
H200 it was slower than the reference and chunked paths (``benchmarks/train.py`` breakdown).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .aligned import lm_logits
from .chunked import linear_cross_entropy_chunked
from .reference import linear_cross_entropy_ref

LCE_BACKENDS = ("auto", "triton", "chunked", "liger", "reference")


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
        backend = "triton" if hidden.is_cuda and _triton_available() else "chunked"
    if backend == "triton":
        from .triton import linear_cross_entropy_triton

        return linear_cross_entropy_triton(hidden, weight, bias, targets, ignore_index)
    if backend == "liger":
        if not liger_available():
            raise ValueError("backend='liger' requested but liger_kernel does not import (pip install liger-kernel)")
        return _liger(hidden, weight, bias, targets, ignore_index)
    if backend == "chunked":
        return linear_cross_entropy_chunked(hidden, weight, bias, targets, ignore_index)
    return linear_cross_entropy_ref(hidden, weight, bias, targets, ignore_index)


@functools.lru_cache(maxsize=None)
def _triton_available() -> bool:
    try:
        from . import triton  # noqa: F401
    except Exception:  # triton missing or broken: the chunked path runs
        return False
    return True


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Summed fp32 cross-entropy of ``logits [N, V]`` (any float dtype) against ``targets [N]``.

    Without autograd on CUDA one Triton pass reads the logits in their own dtype (no fp32 copy); otherwise
    ``F.cross_entropy`` on the fp32 logits (the reference)."""
    if logits.is_cuda and not (torch.is_grad_enabled() and logits.requires_grad) and _triton_available():
        from .triton import cross_entropy_rows

        if logits.stride(-1) != 1:
            logits = logits.contiguous()
        return cross_entropy_rows(logits, targets.contiguous(), ignore_index).sum()
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction="sum")
