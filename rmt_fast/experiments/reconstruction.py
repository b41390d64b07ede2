"""Memory reconstruction: an auxiliary loss that asks each memory to rebuild masked tokens of the segment it was
written from (encoder backbones).

On a memory task the answer's loss reaches the write side of the memory only through the read side: a hub question
of the reasoning task ("What is north of the hub?") asks the memory for a place *and* its direction, but while the
read side does not yet look for a direction, the gradient on the memory asks for both candidate places alike, and the
write side keeps the places only (benchmarks/results/reproduction/README.md). The reconstruction loss gives the write
side a signal of its own: after segment k wrote memory M_k, segment k is run again with a share of its tokens
replaced by the tokenizer's mask token and M_k as its memory, and a small head predicts the masked tokens from the
last-layer states. A masked direction word between two visible places is known from the memory alone.

``loss = answer loss + coef * mean over the segments of (masked-token cross-entropy)``

The recurrence runs as one call per segment (full BPTT through the memory handoffs, as one call over all of them),
so that every written memory is at hand; the reconstruction passes add one backbone pass per segment, each batched
with the next segment's pass (the two read the same memory). These calls run eagerly (``cuda_graphs`` off for their
duration): each feeds the next before the one backward.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

__all__ = ["ReconstructionHead", "mask_tokens", "reconstruction_step_loss", "whole_segments"]


class ReconstructionHead(nn.Module):
    """Last-layer states ``[..., d]`` -> vocabulary logits: dense, GELU, LayerNorm, then the backbone's input
    embedding matrix (tied, not owned: it is the backbone's parameter) plus a bias of its own."""

    def __init__(self, embeddings: nn.Embedding):
        super().__init__()
        vocab, d = embeddings.weight.shape
        self.transform = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.LayerNorm(d))
        self.bias = nn.Parameter(torch.zeros(vocab))
        self._embeddings = (embeddings,)  # a tuple: not registered as a submodule, so not saved or optimised twice

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        w = self._embeddings[0].weight
        return self.transform(h.to(self.bias.dtype)) @ w.t().to(self.bias.dtype) + self.bias


def mask_tokens(ids: torch.Tensor, mask_token_id: int, prob: float, generator: torch.Generator | None = None):
    """``(masked ids, targets)``: each token is replaced by ``mask_token_id`` with probability ``prob`` (at least one
    per row); ``targets`` holds the original id there and -100 elsewhere."""
    if not 0 < prob <= 1:
        raise ValueError(f"prob must be in (0, 1], got {prob}")
    u = torch.rand(ids.shape, generator=generator, device="cpu").to(ids.device)
    chosen = u < prob
    chosen[torch.arange(ids.shape[0], device=ids.device), u.argmin(1)] = True  # at least one per row
    masked = torch.where(chosen, torch.full_like(ids, mask_token_id), ids)
    targets = torch.where(chosen, ids, torch.full_like(ids, -100))
    return masked, targets


def whole_segments(ids: torch.Tensor, labels: torch.Tensor, segment_size: int, what: str) -> int:
    """The number of segments n >= 1 of ``ids [B, n * segment_size]``; a ValueError naming ``ids`` or ``labels``
    (one class per row) when the batch is not one of whole segments, as the memory tasks make them."""
    b, t = ids.shape
    n = t // segment_size
    if n < 1 or n * segment_size != t:
        raise ValueError(f"ids: {what} needs rows of whole segments of {segment_size} tokens, got length {t}")
    if labels.shape != (b,):
        raise ValueError(f"labels: one class per row ({b},) expected, got {tuple(labels.shape)}")
    return n


def reconstruction_step_loss(rmt, head: ReconstructionHead, ids: torch.Tensor, labels: torch.Tensor,
                             segment_size: int, mask_token_id: int, prob: float, coef: float,
                             generator: torch.Generator | None = None, last: bool = True):
    """``(total loss, answer loss, reconstruction loss)`` of one batch ``ids [B, n * segment_size]`` (every row
    exactly n >= 1 segments, as the memory tasks make them), ``labels [B]``. Every segment's memory rebuilds that
    segment's masked tokens; ``last=False`` leaves out the last segment's (which no later segment reads; a
    one-segment batch then has a reconstruction loss of 0). The token states of a segment are where the RMT's layout
    puts them (``scheme.token_span``).

    The passes run as ``n + 1`` calls (``n`` with ``last=False``): the masked pass of segment k reads the memory
    that segment k+1 reads too, so the two share one call of twice the batch."""
    n = whole_segments(ids, labels, segment_size, "the reconstruction loss")
    config = rmt.rmt_config
    graphs, config.cuda_graphs = config.cuda_graphs, False
    try:
        return _chained_loss(rmt, head, ids, labels, segment_size, n, mask_token_id, prob, coef, generator, last)
    finally:
        config.cuda_graphs = graphs


def _chained_loss(rmt, head, ids, labels, segment_size, n, mask_token_id, prob, coef, generator, last):
    b = ids.shape[0]
    span = rmt.runner.scheme.token_span(segment_size)
    segments = [ids[:, k * segment_size:(k + 1) * segment_size] for k in range(n)]
    masked = [mask_tokens(seg, mask_token_id, prob, generator) for seg in segments]
    rec, memory, answer_logits = [], None, None

    def reconstruct(states, k):  # states [B, N, d] of segment k's masked pass; the head reads masked positions only
        targets = masked[k][1]
        chosen = targets != -100
        logits = head(states[:, span][chosen])
        return F.cross_entropy(logits.float(), targets[chosen])

    for k in range(n + 1):
        rows = [segments[k]] if k < n else []  # segment k, from the memory segment k-1 wrote
        rebuild = k > 0 and (k < n or last)
        if rebuild:  # the masked copy of segment k-1, from the same memory
            rows.append(masked[k - 1][0])
        if not rows:
            break
        mem = None if memory is None else torch.cat([memory] * len(rows))
        out = rmt(input_ids=torch.cat(rows), memory=mem, return_logits=False)
        if k < n:
            memory = out.memory[:b]
            if k == n - 1:
                answer_logits = out.logits[:b]
        if rebuild:
            rec.append(reconstruct(out.last_hidden_state[-b:], k - 1))
    answer = rmt.adapter.classification_loss(answer_logits, labels, None)
    rec_loss = torch.stack(rec).mean() if rec else answer.new_zeros(())
    return answer + coef * rec_loss, answer, rec_loss
