"""Fused Triton kernels for the small operations of a Llama-family block, for inference (no autograd).

At small batch a segment is a few hundred rows, and the block's elementwise work (RMSNorm: seven kernels, rotary
embedding: about ten per layer, SiLU-and-multiply: two) costs more than its matrix products: on an H200, Llama
12L/768 at B=1 spent 30 of 47 ms of a 16k-token RMT forward in such kernels. Each function here is one kernel
that computes what the HuggingFace code computes, rounding where it rounds (to the input dtype between steps), so
results match the model's own code to one rounding step of the output: the GPU contracts multiply-adds (FMA) and
RMSNorm's mean is summed in another order (on the CPU interpreter the rotary embedding is bit-equal).

- :func:`rms_norm`: ``weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)`` (LlamaRMSNorm).
- :func:`rotary`: ``x * cos + rotate_half(x) * sin`` for q ``[B, H, N, D]`` (any strides, last dim contiguous)
  with cos/sin ``[B or 1, N, D]`` (apply_rotary_pos_emb with ``unsqueeze_dim=1``).
- :func:`silu_mul`: ``silu(gate) * up`` (the SwiGLU MLP's middle).

Inputs are CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` (tests). :func:`supported` says whether a
tensor can take these kernels; callers fall back to the model's code otherwise (rmt_fast/fusion.py).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .launch import Launcher

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_NORM_DIM = 16384  # one row of RMSNorm is held in registers
_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def supported(x: torch.Tensor) -> bool:
    """Whether ``x``'s device and dtype suit these kernels (CUDA: sm_80+, as the other Triton kernels here)."""
    if x.dtype not in DTYPES:
        return False
    return _sm80(x.device.index) if x.is_cuda else _INTERPRET and x.device.type == "cpu"


@functools.lru_cache(maxsize=None)
def _sm80(index: int | None) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 8


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@triton.jit
def _round(x, DTYPE: tl.constexpr):
    """x (fp32) rounded to DTYPE and back: where the PyTorch code stores an intermediate in the input dtype."""
    return x.to(DTYPE).to(tl.float32)


@triton.jit
def _rms_norm_kernel(X, W, Y, n_cols, stride_x, stride_y, eps,
                     X_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    var = tl.sum(x * x, axis=0) / n_cols
    y = _round(x * tl.rsqrt(var + eps), X_DTYPE)
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (w * y).to(Y.dtype.element_ty), mask=ok)


_rms_norm = Launcher(_rms_norm_kernel)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm's forward: ``[..., d]`` in, ``[..., d]`` out in ``promote(weight, x)``'s dtype (as HF's)."""
    d = x.shape[-1]
    x2 = x.reshape(-1, d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    y = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
    block = max(16, triton.next_power_of_2(d))
    if x2.shape[0]:
        _rms_norm((x2.shape[0],), x2, weight, y, d, x2.stride(0), y.stride(0), float(eps),
                  X_DTYPE=_TL[x.dtype], BLOCK=block, num_warps=1 if _INTERPRET else min(16, max(1, block // 256)))
    return y.view(x.shape)


@triton.jit
def _rotary_kernel(X, COS, SIN, OUT, n_rows, heads, half,
                   sx_b, sx_h, sx_n, sc_b, sc_n, ss_b, ss_n, so_b, so_h, so_n,
                   X_DTYPE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    r = tl.program_id(0)
    b = (r // n_rows).to(tl.int64)
    n = (r % n_rows).to(tl.int64)
    hs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_HALF)
    cok = cols < half
    c1 = tl.load(COS + b * sc_b + n * sc_n + cols, mask=cok, other=0.0).to(tl.float32)
    c2 = tl.load(COS + b * sc_b + n * sc_n + half + cols, mask=cok, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + b * ss_b + n * ss_n + cols, mask=cok, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + b * ss_b + n * ss_n + half + cols, mask=cok, other=0.0).to(tl.float32)
    ok = (hs[:, None] < heads) & cok[None, :]
    xp = X + b * sx_b + hs[:, None].to(tl.int64) * sx_h + n * sx_n + cols[None, :]
    x1 = tl.load(xp, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(xp + half, mask=ok, other=0.0).to(tl.float32)
    # x * cos + cat(-x2, x1) * sin, each product and the sum rounded to the input dtype as PyTorch does
    o1 = _round(x1 * c1[None, :], X_DTYPE) + _round(-x2 * s1[None, :], X_DTYPE)
    o2 = _round(x2 * c2[None, :], X_DTYPE) + _round(x1 * s2[None, :], X_DTYPE)
    op = OUT + b * so_b + hs[:, None].to(tl.int64) * so_h + n * so_n + cols[None, :]
    tl.store(op, o1.to(OUT.dtype.element_ty), mask=ok)
    tl.store(op + half, o2.to(OUT.dtype.element_ty), mask=ok)


_rotary = Launcher(_rotary_kernel)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos[:, None] + rotate_half(x) * sin[:, None]`` for x ``[B, H, N, D]`` and cos/sin ``[B or 1, N, D]``
    of x's dtype (D even; x's last dim contiguous). The output has x's shape, dtype and memory layout."""
    b, h, n, d = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.expand(b, n, d), sin.expand(b, n, d)
    if cos.stride(-1) != 1:
        cos = cos.contiguous()
    if sin.stride(-1) != 1:
        sin = sin.contiguous()
    out = torch.empty_like(x)  # x's layout where x is dense; the kernel needs the output's last dim contiguous
    if out.stride(-1) != 1:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    half = d // 2
    block_half = max(16, triton.next_power_of_2(half))
    block_h = 1 if _INTERPRET else max(1, min(triton.next_power_of_2(h), 4096 // block_half))
    if b * n and h:
        _rotary((b * n, _cdiv(h, block_h)),
                x, cos, sin, out, n, h, half, x.stride(0), x.stride(1), x.stride(2), cos.stride(0), cos.stride(1),
                sin.stride(0), sin.stride(1), out.stride(0), out.stride(1), out.stride(2),
                X_DTYPE=_TL[x.dtype], BLOCK_H=block_h, BLOCK_HALF=block_half, num_warps=1 if _INTERPRET else 4)
    return out


@triton.jit
def _silu_mul_kernel(G, U, OUT, numel, X_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    g = tl.load(G + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=ok, other=0.0).to(tl.float32)
    act = _round(g / (1.0 + tl.exp(-g)), X_DTYPE)  # F.silu in the input dtype
    tl.store(OUT + offs, (act * u).to(OUT.dtype.element_ty), mask=ok)


_silu_mul = Launcher(_silu_mul_kernel)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``F.silu(gate) * up`` for two tensors of one shape and dtype."""
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    numel = gate.numel()
    block = 1024 if _INTERPRET else 2048
    if numel:
        _silu_mul((_cdiv(numel, block),), gate, up, out, numel, X_DTYPE=_TL[gate.dtype], BLOCK=block,
                  num_warps=1 if _INTERPRET else 8)
    return out

