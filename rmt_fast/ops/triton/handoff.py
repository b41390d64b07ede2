"""Triton segment handoff: read each row's memory from the last hidden states, write it into the next input.

Semantics: :func:`rmt_fast.ops.reference.segment_handoff_ref`. Forward runs one pass over the bytes (each
output row is copied once, memory rows come straight from ``hidden``/``memory``); backward is index arithmetic
in PyTorch (the same bytes the other way).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _gather_memory_kernel(hidden_ptr, memory_ptr, offsets_ptr, out_ptr, m, d,
                          s_hb, s_hn, s_mb, s_mn, s_ob, s_on,
                          BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1).to(tl.int64)
    off = tl.load(offsets_ptr + b).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    for d0 in range(0, d, BLOCK_D):
        c = d0 + cols
        mask = c < d
        if off >= 0:
            x = tl.load(hidden_ptr + b * s_hb + (off + i) * s_hn + c, mask=mask)
        else:
            x = tl.load(memory_ptr + b * s_mb + i * s_mn + c, mask=mask)
        tl.store(out_ptr + b * s_ob + i * s_on + c, x.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _place_memory_kernel(tok_ptr, mem_ptr, write_ptr, out_ptr, n, m, d, read_offset,
                         s_tb, s_tn, s_mb, s_mn, s_ob, s_on,
                         HAS_WRITE: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1).to(tl.int64)
    slot = tl.where((j >= read_offset) & (j < read_offset + m), j - read_offset, -1).to(tl.int64)
    if HAS_WRITE:
        w = tl.load(write_ptr + b).to(tl.int64)
        slot = tl.where((j >= w) & (j < w + m), j - w, slot).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    for d0 in range(0, d, BLOCK_D):
        c = d0 + cols
        mask = c < d
        if slot >= 0:
            x = tl.load(mem_ptr + b * s_mb + slot * s_mn + c, mask=mask)
        else:
            x = tl.load(tok_ptr + b * s_tb + j * s_tn + c, mask=mask)
        tl.store(out_ptr + b * s_ob + j * s_on + c, x.to(out_ptr.dtype.element_ty), mask=mask)


def _block_d(d: int) -> int:
    return min(triton.next_power_of_2(d), 1024)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, memory, offsets):
        hidden, memory = _rows(hidden), _rows(memory)
        b, m, d = memory.shape
        out = torch.empty(b, m, d, dtype=hidden.dtype, device=hidden.device)
        _gather_memory_kernel[(b, m)](hidden, memory, offsets, out, m, d, hidden.stride(0), hidden.stride(1),
                                      memory.stride(0), memory.stride(1), out.stride(0), out.stride(1),
                                      BLOCK_D=_block_d(d))
        ctx.save_for_backward(offsets)
        ctx.shapes = (hidden.shape, memory.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        (offsets,) = ctx.saved_tensors
        hidden_shape, mem_dtype = ctx.shapes
        b, m, d = grad.shape
        keep = (offsets < 0).view(b, 1, 1)
        g_mem = torch.where(keep, grad, torch.zeros((), dtype=grad.dtype, device=grad.device)).to(mem_dtype)
        g_hidden = grad.new_zeros(hidden_shape)
        pos = offsets.clamp(min=0).view(b, 1) + torch.arange(m, device=grad.device)
        g_hidden.scatter_add_(1, pos.unsqueeze(-1).expand(b, m, d), torch.where(keep, 0, grad))
        return g_hidden, g_mem, None


class _Place(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tok, memory, read_offset, write_offsets):
        tok, mem = _rows(tok), _rows(memory.to(tok.dtype))
        b, n, d = tok.shape
        m = mem.shape[1]
        out = torch.empty(b, n, d, dtype=tok.dtype, device=tok.device)
        has_write = write_offsets is not None
        _place_memory_kernel[(b, n)](tok, mem, write_offsets if has_write else tok, out, n, m, d, read_offset,
                                     tok.stride(0), tok.stride(1), mem.stride(0), mem.stride(1),
                                     out.stride(0), out.stride(1), HAS_WRITE=has_write, BLOCK_D=_block_d(d))
        ctx.save_for_backward(write_offsets if has_write else None)
        ctx.info = (read_offset, m, memory.dtype, has_write)
        return out

    @staticmethod
    def backward(ctx, grad):
        (write_offsets,) = ctx.saved_tensors
        read_offset, m, mem_dtype, has_write = ctx.info
        b, n, d = grad.shape
        slot = torch.arange(m, device=grad.device).view(1, m)
        pos = (slot + read_offset).expand(b, m)
        if has_write:
            pos = torch.cat([pos, write_offsets.view(b, 1) + slot], 1)
        idx = pos.unsqueeze(-1).expand(-1, -1, d)
        taken = grad.gather(1, idx)
        g_mem = taken[:, :m] + (taken[:, m:] if has_write else 0)
        g_tok = grad.scatter(1, idx, torch.zeros_like(taken))
        return g_tok, g_mem.to(mem_dtype), None, None


def segment_handoff_triton(hidden, memory, gather_offsets, token_embeds, read_offset, write_offsets):
    """Same contract as :func:`rmt_fast.ops.reference.segment_handoff_ref`."""
    if memory.shape[1] == 0:
        return memory, token_embeds
    if hidden is not None:
        memory = _Gather.apply(hidden, memory, gather_offsets.contiguous())
    if token_embeds is None:
        return memory, None
    wo = write_offsets.contiguous() if write_offsets is not None else None
    return memory, _Place.apply(token_embeds, memory, int(read_offset), wo)
