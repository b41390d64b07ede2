"""Thin loader of the compiled ``rmt_fast._C`` extension (CUDA C++ kernels, sm_61+), with autograd.

The kernels live in ``csrc/`` (torch-free ``.cu`` files; ``csrc/bindings.cpp`` is the torch glue). This module
imports without the extension: then :func:`available` is False and the ops raise.

Dtypes: the attention kernels take float32 and float16 (fp32 math); bfloat16 inputs are upcast to float32
here (the output is cast back to bfloat16, gradients flow through the casts), other dtypes raise ValueError.
The handoff kernels take float32, float16 and bfloat16 natively.
"""
from __future__ import annotations

import torch

from .reference import SegmentLayout, check_attention_inputs

try:
    from rmt_fast import _C  # type: ignore[attr-defined]
except ImportError:  # built without CUDA, or RMT_FAST_NO_EXT=1
    _C = None

# op name -> the extension functions it needs
_OPS = {
    "memory_attention": ("memory_attention_fwd", "memory_attention_bwd"),
    "segment_handoff": ("segment_handoff_fwd", "segment_handoff_bwd"),
}
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def available() -> bool:
    return _C is not None and torch.cuda.is_available()


def has_op(name: str) -> bool:
    """Whether the extension is usable and provides op ``name`` (an ``_OPS`` key or a raw ``_C`` attribute)."""
    return available() and all(hasattr(_C, fn) for fn in _OPS.get(name, (name,)))


def _require(op: str) -> None:
    if not has_op(op):
        raise RuntimeError(f"rmt_fast: the CUDA extension rmt_fast._C with {op} is not available "
                           "(not built, or no CUDA device); use backend='reference' or 'triton'")


class _MemoryAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, seq_lens, num_read, num_write, causal, bidirectional, scale):
        out, lse = _C.memory_attention_fwd(q, k, v, seq_lens, num_read, num_write, causal, bidirectional, scale)
        ctx.save_for_backward(q, k, v, out, lse, seq_lens)
        ctx.mask = (num_read, num_write, causal, bidirectional, scale)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, k, v, out, lse, seq_lens = ctx.saved_tensors
        dq, dk, dv = _C.memory_attention_bwd(dout, q, k, v, out, lse, seq_lens, *ctx.mask)
        return dq, dk, dv, None, None, None, None, None, None


def _check_attention_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SegmentLayout) -> None:
    check_attention_inputs(q, k, v, layout, check_lengths=False)
    d = q.shape[-1]
    if not 1 <= d <= 128:
        raise ValueError(f"the CUDA kernels take head dims 1..128, got {d}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in _DTYPE_CODES:
        raise ValueError(f"the CUDA attention takes float32, float16 or bfloat16 (upcast), got {q.dtype}")


def memory_attention_cuda(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SegmentLayout, scale: float | None = None
) -> torch.Tensor:
    """Softmax attention under the RMT segment mask on the CUDA extension (see ``memory_attention_ref``).

    q: ``[B, Hq, N, D]``; k, v: ``[B, Hkv, N, D]``, ``Hq % Hkv == 0``, ``D <= 128``, on one CUDA device;
    float32 or float16 (bfloat16 is computed in float32). Any strides with a contiguous last dim.
    Returns ``[B, Hq, N, D]`` in q's dtype; rows at or past ``layout.valid_lens[b]`` are zeros.
    """
    _require("memory_attention")
    _check_attention_shapes(q, k, v, layout)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    seq_lens = layout.seq_lens.to(device=q.device, dtype=torch.int32, non_blocking=True)
    args = (seq_lens, layout.num_read, layout.num_write, bool(layout.causal), bool(layout.memory_bidirectional), scale)
    if q.dtype == torch.bfloat16:
        return _MemoryAttention.apply(q.float(), k.float(), v.float(), *args).to(torch.bfloat16)
    return _MemoryAttention.apply(q, k, v, *args)


class _SegmentHandoff(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, memory, gather_offsets, token_embeds, read_offset, write_offsets):
        new_memory, embeds = _C.segment_handoff_fwd(hidden, memory, gather_offsets, token_embeds, read_offset,
                                                    write_offsets)
        ctx.save_for_backward(gather_offsets, write_offsets)
        ctx.read_offset = read_offset
        has_hidden = hidden is not None
        hidden_dtype = hidden.dtype if has_hidden else memory.dtype
        ctx.dims = [memory.shape[0], memory.shape[1], memory.shape[2], hidden.shape[1] if has_hidden else 0,
                    token_embeds.shape[1]]
        ctx.dtypes = (hidden_dtype, memory.dtype, token_embeds.dtype)
        ctx.device = token_embeds.device
        ctx.set_materialize_grads(False)  # a None gradient is read as zero by the kernel
        return new_memory, embeds

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_new_memory, grad_embeds):
        gather_offsets, write_offsets = ctx.saved_tensors
        b, m, d, n_prev, n = ctx.dims
        hidden_dtype, memory_dtype, embeds_dtype = ctx.dtypes
        need_hidden, need_memory, _, need_embeds = ctx.needs_input_grad[:4]

        def empty(shape, dtype, wanted):
            return torch.empty(shape, dtype=dtype, device=ctx.device) if wanted else None

        grad_hidden = empty((b, n_prev, d), hidden_dtype, need_hidden and gather_offsets is not None)
        grad_memory = empty((b, m, d), memory_dtype, need_memory)
        grad_token_embeds = empty((b, n, d), embeds_dtype, need_embeds)
        if grad_new_memory is None and grad_embeds is None:
            for g in (grad_hidden, grad_memory, grad_token_embeds):
                if g is not None:
                    g.zero_()
        else:
            _C.segment_handoff_bwd(grad_new_memory, grad_embeds, gather_offsets, write_offsets, ctx.read_offset,
                                   ctx.dims, [_DTYPE_CODES[t] for t in ctx.dtypes], grad_hidden, grad_memory,
                                   grad_token_embeds)
        return grad_hidden, grad_memory, None, grad_token_embeds, None, None


def segment_handoff_cuda(
    hidden: torch.Tensor | None,
    memory: torch.Tensor,
    gather_offsets: torch.Tensor | None,
    token_embeds: torch.Tensor | None,
    read_offset: int,
    write_offsets: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`rmt_fast.ops.reference.segment_handoff_ref` on the CUDA extension, in one fused kernel each way.

    Same shapes and semantics; float32 / float16 / bfloat16, any mix. No device-side checks (no syncs): a
    gathered row past the end of ``hidden`` reads as NaN, write slots outside ``[0, N)`` are skipped.
    Where a read and a write block overlap, the read slot's value is written.
    """
    _require("segment_handoff")
    if token_embeds is None:  # the read half alone (last segment) is one gather: no kernel of its own
        from .reference import segment_handoff_ref

        return segment_handoff_ref(hidden, memory, gather_offsets, None, read_offset, None)
    if memory.dim() != 3 or token_embeds.dim() != 3:
        raise ValueError(f"memory must be [B, m, d] and token_embeds [B, N, d], got {tuple(memory.shape)} "
                         f"and {tuple(token_embeds.shape)}")
    b, m, _ = memory.shape
    if m == 0:
        return memory, token_embeds
    if not 0 <= read_offset <= token_embeds.shape[1] - m:
        raise ValueError(f"read_offset must be in [0, {token_embeds.shape[1] - m}] so that {m} read slots fit "
                         f"into {token_embeds.shape[1]} positions, got {read_offset}")
    for name, t in (("memory", memory), ("token_embeds", token_embeds), ("hidden", hidden)):
        if t is not None and t.dtype not in _DTYPE_CODES:
            raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if hidden is not None and gather_offsets is None:
        raise ValueError("gather_offsets is required when hidden is given")
    dev = token_embeds.device
    gather = None if hidden is None else gather_offsets.to(device=dev, dtype=torch.int32)
    write = None if write_offsets is None else write_offsets.to(device=dev, dtype=torch.int32)
    return _SegmentHandoff.apply(hidden, memory, gather, token_embeds, int(read_offset), write)
