"""An LM head whose matmuls run with aligned leading dimensions, whatever the vocabulary size.

cuBLAS runs a matmul whose leading dimension is not a multiple of 8 elements (16 bytes in bf16/fp16) with slower
kernels (on Hopper, without TMA). An odd vocabulary, GPT-2's 50257 for one, makes every LM-head matmul such a
matmul: the logits ``[N, V]``, and in training both matmuls of their gradient. Here, on CUDA and only when
``V % 8 != 0``, the weight (and bias) gets zero rows up to a multiple of :data:`ALIGN`, the matmul runs on the
padded weight, and the logits are the first ``V`` columns of the padded result: a row-strided view, equal to
``F.linear(hidden, weight, bias)`` (the extra columns are never read). The padded weight is an autograd-tracked
copy, so gradients reach the model's own weight.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ALIGN = 128
PAD_ON_CPU = False  # tests set this to run the padded path on CPU tensors
ENABLED = True  # benchmarks set this to False to time the unpadded matmuls


def needs_padding(weight: torch.Tensor) -> bool:
    return ENABLED and weight.shape[0] % 8 != 0 and (weight.is_cuda or PAD_ON_CPU)


def compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype F.linear computes in for ``hidden`` here (autocast's dtype when autocast is on)."""
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return hidden.dtype


def head_weights(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, pad: bool):
    """(weight, bias) in ``dtype``; with ``pad``, zero rows (entries) appended up to a multiple of ALIGN."""
    extra = (-weight.shape[0]) % ALIGN if pad else 0
    w = weight.to(dtype)
    b = None if bias is None else bias.to(dtype)
    if extra:
        w = F.pad(w, (0, 0, 0, extra))
        b = None if b is None else F.pad(b, (0, extra))
    return w, b


def lm_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``hidden @ weight.T + bias`` (``[..., d]`` -> ``[..., V]``), computed on an aligned padded weight when the
    vocabulary size would misalign the matmul (see the module docstring)."""
    if not needs_padding(weight):
        return F.linear(hidden, weight, bias)
    w, b = head_weights(weight, bias, compute_dtype(hidden), pad=True)
    return F.linear(hidden, w, b)[..., :weight.shape[0]]
