"""Linear + cross-entropy with a Triton row kernel: logits exist only in the model's dtype, chunk by chunk.

Per row chunk: the logits ``h @ W.T + b`` come from one cuBLAS matmul in hidden's dtype; one kernel pass per row
computes the fp32 log-sum-exp (online, in blocks of the vocabulary) and the row's loss, and, when gradients are
needed, overwrites the logits in place with ``dlogits = softmax - onehot`` (zero at ignored rows), from which two
matmuls give the gradients of hidden and weight. The fp32 ``[N, V]`` tensor of the plain path never exists; the
loss equals the reference's up to the order of fp32 summation. An odd vocabulary (GPT-2's) runs its matmuls on a
zero-padded weight (:mod:`.aligned`), so that none of them has a misaligned leading dimension.

Under ``TRITON_INTERPRET=1`` the kernel runs on CPU tensors (tests); every load is upcast to fp32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..launch import Launcher

from .aligned import compute_dtype, head_weights, needs_padding
from .chunked import GradientsInForward

CHUNK_BYTES = 1 << 28  # logits per chunk, in hidden's dtype (256 MiB)
BLOCK_V = 4096


@triton.jit
def _cross_entropy_rows(LOGITS, stride_row, TARGETS, LOSS, n_cols, ignore_index,
                        WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = LOGITS + row.to(tl.int64) * stride_row
    target = tl.load(TARGETS + row).to(tl.int32)
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.full([], 0.0, tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    lse = m + tl.log(s)
    valid = target != ignore_index
    picked = tl.load(base + tl.where(valid, target, 0)).to(tl.float32)
    tl.store(LOSS + row, tl.where(valid, lse - picked, 0.0))
    if WRITE_GRAD:
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
            p = tl.exp(x - lse)
            p = tl.where(cols == target, p - 1.0, p)
            p = tl.where(valid, p, 0.0)
            tl.store(base + cols, p.to(LOGITS.dtype.element_ty), mask=cols < n_cols)


_ce_rows = Launcher(_cross_entropy_rows)


def cross_entropy_rows(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                       write_grad: bool = False) -> torch.Tensor:
    """Per-row fp32 cross-entropy of ``logits [N, V]`` (unit stride along V; rows may be strided, e.g. the first V
    columns of padded logits) against ``targets [N]`` (0 at ignored rows). With ``write_grad`` the logits are
    overwritten with ``softmax - onehot`` (0 at ignored rows)."""
    if logits.stride(-1) != 1:
        raise ValueError("cross_entropy_rows: logits must have unit stride along the vocabulary")
    n, v = logits.shape
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n:
        _ce_rows((n,), logits, logits.stride(0), targets, loss, v, ignore_index, WRITE_GRAD=write_grad,
                 BLOCK=min(BLOCK_V, triton.next_power_of_2(v)))
    return loss


class _TritonLinearCrossEntropy(GradientsInForward):
    """Gradients are computed in the forward (as the chunked path does); the backward only scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index):
        v = weight.shape[0]
        w, b = head_weights(weight, bias, compute_dtype(hidden), needs_padding(weight))
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grads = need_h or need_w or (need_b and bias is not None)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = None
        grad_b = torch.zeros(v, dtype=torch.float32, device=weight.device) if (need_b and bias is not None) else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        chunks = _row_chunks(hidden.shape[0], w)
        for s, e in chunks:
            h = hidden[s:e].to(w.dtype)
            logits = F.linear(h, w, b)  # [rows, Vp]: aligned; the loss reads the first v columns
            loss += cross_entropy_rows(logits[:, :v], targets[s:e], ignore_index, write_grad=grads).sum()
            if not grads:
                continue
            if grad_h is not None:
                grad_h[s:e] = logits @ w
            if need_w:
                gw = (logits.t() @ h)[:v]
                if len(chunks) == 1:
                    grad_w = gw
                elif grad_w is None:
                    grad_w = gw.float()
                else:
                    grad_w += gw
            if grad_b is not None:
                grad_b += logits[:, :v].float().sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return loss


def _row_chunks(n: int, w: torch.Tensor) -> list:
    rows = max(1, min(n, CHUNK_BYTES // max(w.shape[0] * w.element_size(), 1)))
    return [(s, min(n, s + rows)) for s in range(0, n, rows)]


def linear_cross_entropy_triton(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Same contract as :func:`~rmt_fast.ops.linear_cross_entropy.reference.linear_cross_entropy_ref`."""
    targets = targets.contiguous()
    wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if not wants_grad:
        with torch.no_grad():
            v = weight.shape[0]
            w, b = head_weights(weight, bias, compute_dtype(hidden), needs_padding(weight))
            loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for s, e in _row_chunks(hidden.shape[0], w):
                logits = F.linear(hidden[s:e].to(w.dtype), w, b)
                loss += cross_entropy_rows(logits[:, :v], targets[s:e], ignore_index).sum()
            return loss
    return _TritonLinearCrossEntropy.apply(hidden, weight, bias, targets, ignore_index)
