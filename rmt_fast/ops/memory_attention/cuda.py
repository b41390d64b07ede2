"""Memory-token attention on the CUDA extension (``csrc/memory_attention.cu``, plain CUDA cores, sm_61+).

The kernels take float32 and float16 (fp32 math); bfloat16 inputs are computed in float32 here and cast back.
With a short-term cache (``num_cache > 0``) k and v hold the cache's ``num_cache`` positions before the segment's
``N`` (``spec.mask_rule``); ``cache_lens`` ``[B]`` int32 gives each row's real cache keys (None: all).
"""
from __future__ import annotations

import torch

from ..cuda import extension

_KERNEL_DTYPES = (torch.float32, torch.float16)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: torch.Tensor, num_read: int,
            num_write: int, causal: bool, bidirectional: bool, scale: float, num_cache: int = 0,
            cache_lens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q ``[B, Hq, N, D]``, k/v ``[B, Hkv, num_cache + N, D]`` on one CUDA device, seq_lens ``[B]`` int32.

    Returns ``(out, lse)``: out contiguous ``[B, Hq, N, D]`` in q's dtype (zeros at padding queries), lse
    ``[B, Hq, N]`` fp32 (base 2, ``+inf`` at padding queries).
    """
    dtype = q.dtype
    if dtype not in _KERNEL_DTYPES:
        q, k, v = q.float(), k.float(), v.float()
    out, lse = extension("memory_attention").memory_attention_fwd(q, k, v, seq_lens, num_read, num_write, causal,
                                                                  bidirectional, scale, num_cache, cache_lens)
    return out.to(dtype), lse


def backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             lse: torch.Tensor, seq_lens: torch.Tensor, num_read: int, num_write: int, causal: bool,
             bidirectional: bool, scale: float, num_cache: int = 0,
             cache_lens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)``: contiguous, shaped and typed like q, k, v; 0 at padding positions."""
    dtype = q.dtype
    if dtype not in _KERNEL_DTYPES:
        dout, q, k, v, out = dout.float(), q.float(), k.float(), v.float(), out.float()
    dq, dk, dv = extension("memory_attention").memory_attention_bwd(dout, q, k, v, out, lse, seq_lens, num_read,
                                                                    num_write, causal, bidirectional, scale,
                                                                    num_cache, cache_lens)
    return dq.to(dtype), dk.to(dtype), dv.to(dtype)
