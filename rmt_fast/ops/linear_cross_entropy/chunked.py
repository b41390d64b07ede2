"""Linear + cross-entropy over row chunks: the ``[N, V]`` logits never exist at once (any device).

The forward computes, chunk by chunk, the logits in hidden's dtype, the fp32 log-softmax, the loss, and right
away the gradients with respect to the chunk's hidden states and to the weight (``dlogits = softmax - onehot``);
the backward only scales them by the incoming gradient. Peak extra memory: one chunk of fp32 logits plus the
gradient buffers (``[N, d]`` and ``[V, d]``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = 1 << 24  # fp32 logits per chunk (64 MiB)


class GradientsInForward(torch.autograd.Function):
    """A linear + cross-entropy whose forward saves (grad_hidden, grad_weight, grad_bias) of the summed loss and
    the weight/bias dtypes (``ctx.dtypes``); the backward scales them by the incoming gradient."""

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        return (None if grad_h is None else grad_h * grad_loss.to(grad_h.dtype),
                None if grad_w is None else (grad_w * grad_loss).to(w_dtype),
                None if grad_b is None else (grad_b * grad_loss).to(b_dtype), None, None)


class _ChunkedLinearCrossEntropy(GradientsInForward):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index):
        n, v = hidden.shape[0], weight.shape[0]
        rows = max(1, min(n, CHUNK_ELEMENTS // max(v, 1)))
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(v, dtype=torch.float32, device=weight.device) if (need_b and bias is not None) else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s in range(0, n, rows):
            h, t = hidden[s:s + rows], targets[s:s + rows]
            logits = F.linear(h, weight, bias).float()
            lse = torch.logsumexp(logits, dim=-1)
            valid = t != ignore_index
            safe = torch.where(valid, t, 0)
            picked = logits.gather(1, safe.view(-1, 1)).squeeze(1)
            loss += torch.where(valid, lse - picked, 0.0).sum()
            if grad_h is None and grad_w is None and grad_b is None:
                continue
            dlogits = torch.softmax(logits, dim=-1)
            dlogits.scatter_add_(1, safe.view(-1, 1), torch.full_like(picked, -1.0).view(-1, 1))
            dlogits *= valid.view(-1, 1)
            if grad_b is not None:
                grad_b += dlogits.sum(0)
            dlogits = dlogits.to(hidden.dtype)
            if grad_h is not None:
                grad_h[s:s + rows] = dlogits @ weight
            if grad_w is not None:
                grad_w += (dlogits.t() @ h).float()
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return loss


def linear_cross_entropy_chunked(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                 targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Same contract as :func:`~rmt_fast.ops.linear_cross_entropy.reference.linear_cross_entropy_ref`."""
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    if not wants_grad:  # inference, or the forward sweep of checkpointed training: no gradient buffers
        with torch.no_grad():
            return _ChunkedLinearCrossEntropy.forward(_NoGrad(), hidden, weight, bias, targets, ignore_index)
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, bias, targets, ignore_index)


class _NoGrad:
    """A stand-in ctx for running the forward without autograd (nothing needs a gradient)."""

    needs_input_grad = (False, False, False, False, False)

    def save_for_backward(self, *tensors):
        pass
