"""The segment handoff in Triton: one pass over the bytes each way, gather and place forward, torch index ops backward.

Semantics: reference.py. ``gather_forward`` copies each row's new memory straight from ``hidden``/``memory``;
``place_forward`` copies every position of the next input once, from ``token_embeds`` or from the memory. The
backward of each is index arithmetic in PyTorch (the same bytes the other way).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..launch import Launcher


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
            x = tl.load(hidden_ptr + b * s_hb + (off + i) * s_hn + c, mask=mask).to(out_ptr.dtype.element_ty)
        else:
            x = tl.load(memory_ptr + b * s_mb + i * s_mn + c, mask=mask).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + b * s_ob + i * s_on + c, x, mask=mask)


_gather = Launcher(_gather_memory_kernel)


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
            x = tl.load(mem_ptr + b * s_mb + slot * s_mn + c, mask=mask).to(out_ptr.dtype.element_ty)
        else:
            x = tl.load(tok_ptr + b * s_tb + j * s_tn + c, mask=mask).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + b * s_ob + j * s_on + c, x, mask=mask)


_place = Launcher(_place_memory_kernel)


@functools.lru_cache(maxsize=None)
def _block_d(d: int) -> int:
    return min(triton.next_power_of_2(d), 1024)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def gather_forward(hidden: torch.Tensor, memory: torch.Tensor, gather_offsets: torch.Tensor) -> torch.Tensor:
    """hidden ``[B, N_prev, d]``, memory ``[B, m, d]``, gather_offsets ``[B]`` int -> ``[B, m, d]`` (hidden's dtype)."""
    hidden, memory = _rows(hidden), _rows(memory)
    b, m, d = memory.shape
    out = torch.empty(b, m, d, dtype=hidden.dtype, device=hidden.device)
    _gather((b, m), hidden, memory, gather_offsets, out, m, d, *hidden.stride()[:2],
            *memory.stride()[:2], *out.stride()[:2], BLOCK_D=_block_d(d))
    return out


def gather_backward(grad: torch.Tensor, gather_offsets: torch.Tensor, hidden_seq: int, hidden_dtype: torch.dtype,
                    memory_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """grad ``[B, m, d]`` of the new memory -> (grad_hidden ``[B, N_prev, d]``, grad_memory ``[B, m, d]``)."""
    grad = grad.contiguous()  # the outputs are contiguous, as the custom op's fake promises
    b, m, d = grad.shape
    keep = (gather_offsets < 0).view(b, 1, 1)
    zero = torch.zeros((), dtype=grad.dtype, device=grad.device)
    g_memory = torch.where(keep, grad, zero).to(memory_dtype)
    g_hidden = torch.zeros((b, hidden_seq, d), dtype=hidden_dtype, device=grad.device)
    pos = gather_offsets.clamp(min=0).view(b, 1) + torch.arange(m, device=grad.device)
    g_hidden.scatter_add_(1, pos.unsqueeze(-1).expand(b, m, d), torch.where(keep, zero, grad).to(hidden_dtype))
    return g_hidden, g_memory


def place_forward(memory: torch.Tensor, token_embeds: torch.Tensor, read_offset: int,
                  write_offsets: torch.Tensor | None) -> torch.Tensor:
    """memory ``[B, m, d]``, token_embeds ``[B, N, d]`` -> ``[B, N, d]`` (token_embeds' dtype), memory at the slots."""
    tok, mem = _rows(token_embeds), _rows(memory)
    b, n, d = tok.shape
    m = mem.shape[1]
    out = torch.empty(b, n, d, dtype=tok.dtype, device=tok.device)
    has_write = write_offsets is not None
    _place((b, n), tok, mem, write_offsets if has_write else tok, out, n, m, d, read_offset,
           *tok.stride()[:2], *mem.stride()[:2], *out.stride()[:2], HAS_WRITE=has_write, BLOCK_D=_block_d(d))
    return out


def place_backward(grad: torch.Tensor, read_offset: int, write_offsets: torch.Tensor | None, slots: int,
                   memory_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """grad ``[B, N, d]`` of the embeddings -> (grad_memory ``[B, m, d]``, grad_token_embeds ``[B, N, d]``)."""
    grad = grad.contiguous()
    b, n, d = grad.shape
    slot = torch.arange(slots, device=grad.device).view(1, slots)
    pos = (slot + read_offset).expand(b, slots)
    if write_offsets is not None:
        pos = torch.cat([pos, write_offsets.view(b, 1) + slot], 1)
    idx = pos.unsqueeze(-1).expand(-1, -1, d)
    taken = grad.gather(1, idx)
    g_memory = taken[:, :slots] + taken[:, slots:] if write_offsets is not None else taken
    return g_memory.to(memory_dtype), grad.scatter(1, idx, torch.zeros_like(taken))
