"""The segment loop: plan the segments, then per segment place memory -> run backbone -> read memory.

Each row is segmented on its own (variable lengths come from ``attention_mask``; left or right padding).
Inside a segment, decoders use ``[memory | tokens | memory]`` with the write slots right after the row's last
token; encoders ``[CLS] memory [SEP] tokens [SEP]``. Rows without a segment at some step keep their memory.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .adapters import Adapter
from .config import RMTConfig
from .integrations.hf import rmt_attention, segment_layout
from .ops import SegmentLayout, segment_handoff

IGNORE_INDEX = -100


@dataclass
class SegmentPlan:
    """Where every row's content tokens go. ``content[b, c]``: c-th content token of row b (compacted).

    starts, lens: ``[G, B]`` start (in content coordinates) and token count of row b in global segment g.
    last: ``[B]`` the global segment that is row b's last. orig_pos: ``[B, Tc]`` original column of content c.
    """

    content: torch.Tensor
    lengths: torch.Tensor
    orig_pos: torch.Tensor
    starts: torch.Tensor
    lens: torch.Tensor
    last: torch.Tensor

    @property
    def num_segments(self) -> int:
        return self.starts.shape[0]


def compact_rows(input_ids: torch.Tensor, keep: torch.Tensor, fill: int):
    """Move each row's kept tokens to the left. Returns (content [B, Tc], lengths [B], orig_pos [B, Tc])."""
    b, t = input_ids.shape
    lengths = keep.sum(1)
    tc = max(int(lengths.max()), 1)
    dest = torch.where(keep, keep.long().cumsum(1) - 1, torch.full_like(input_ids, tc))  # tc = discard column
    content = torch.full((b, tc + 1), fill, dtype=input_ids.dtype, device=input_ids.device)
    content.scatter_(1, dest, input_ids)
    cols = torch.arange(t, device=input_ids.device).expand(b, t)
    orig = torch.zeros((b, tc + 1), dtype=torch.long, device=input_ids.device)
    orig.scatter_(1, dest, cols)
    return content[:, :tc], lengths, orig[:, :tc]


def plan_segments(content, lengths, orig_pos, segment_size: int, alignment: str) -> SegmentPlan:
    s = segment_size
    n = (lengths + s - 1) // s  # segments per row (lengths >= 1)
    g_total = int(n.max())
    g = torch.arange(g_total, device=lengths.device).view(-1, 1)
    offset = (g_total - n) if alignment == "right" else torch.zeros_like(n)
    k = g - offset.view(1, -1)  # the row's own segment index
    active = (k >= 0) & (k < n.view(1, -1))
    if alignment == "right":
        first = lengths - (n - 1) * s
        starts = torch.where(k == 0, torch.zeros_like(k), first.view(1, -1) + (k - 1) * s)
        lens = torch.where(k == 0, first.view(1, -1), torch.full_like(k, s))
    else:
        starts = k * s
        lens = (lengths.view(1, -1) - starts).clamp(0, s)
    starts = torch.where(active, starts, torch.zeros_like(starts))
    lens = torch.where(active, lens, torch.zeros_like(lens))
    return SegmentPlan(content, lengths, orig_pos, starts, lens, offset + n - 1)


def gather_span(src: torch.Tensor, starts: torch.Tensor, lens: torch.Tensor, width: int, fill) -> torch.Tensor:
    """``out[b, j] = src[b, starts[b] + j]`` for ``j < lens[b]``, else ``fill``. src: [B, T]."""
    j = torch.arange(width, device=src.device).view(1, -1)
    idx = (starts.view(-1, 1) + j).clamp(max=src.shape[1] - 1)
    out = src.gather(1, idx)
    return torch.where(j < lens.view(-1, 1), out, torch.full_like(out, fill))


class SegmentRunner:
    """Runs the recurrence of one forward pass (eagerly, or through :mod:`rmt_fast.graphs` on CUDA)."""

    def __init__(self, adapter: Adapter, config: RMTConfig):
        self.adapter = adapter
        self.config = config
        self.graphs = None  # a rmt_fast.graphs.GraphedSegments, built on first CUDA use with cuda_graphs=True

    # ---- per-segment inputs -------------------------------------------------------------------------
    def segment_params(self, plan: SegmentPlan) -> torch.Tensor:
        """``[G, 5, B]`` per segment: token start, token count, write offset, gather offset (-1: row idle),
        and 1 where the segment is the row's last. Built once per forward, read by every step."""
        m = self.config.num_mem_tokens
        active = plan.lens > 0
        if self.config.mode == "decoder":
            write_off, gather_off = plan.lens + m, torch.where(active, plan.lens + m, -1)
        else:
            write_off, gather_off = torch.zeros_like(plan.lens), torch.where(active, 1, -1)
        g = torch.arange(plan.num_segments, device=plan.lens.device).view(-1, 1)
        is_last = (plan.last.view(1, -1) == g).long()
        return torch.stack([plan.starts, plan.lens, write_off, gather_off, is_last], 1)

    def segment_inputs(self, content: torch.Tensor, params: torch.Tensor, width: int, dense: bool = False):
        """Token ids ``[B, N]`` of one segment (memory slots hold a placeholder) and its layout.

        params: one ``[5, B]`` slice of :meth:`segment_params`; width: token columns (>= the longest row);
        dense: every row has exactly ``width`` tokens. No host synchronisation (it can run in a CUDA graph).
        """
        cfg, m = self.config, self.config.num_mem_tokens
        starts, lens = params[0], params[1]
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
        toks = gather_span(content, starts, lens, width, pad)
        b = toks.shape[0]
        if cfg.mode == "decoder":
            slots = torch.full((b, m), pad, dtype=toks.dtype, device=toks.device)
            ids = torch.cat([slots, toks, slots], 1)
            return ids, SegmentLayout(m, m, lens, causal=True, memory_bidirectional=cfg.memory_bidirectional,
                                      dense=dense)
        head = torch.full((b, m + 2), pad, dtype=toks.dtype, device=toks.device)
        head[:, 0] = cfg.cls_token_id
        head[:, m + 1] = cfg.sep_token_id
        tail = torch.full((b, 1), pad, dtype=toks.dtype, device=toks.device)
        ids = torch.cat([head, toks, tail], 1)
        ids.scatter_(1, (lens + m + 2).view(-1, 1), cfg.sep_token_id)  # [SEP] right after each row's tokens
        return ids, SegmentLayout(m + 2, 0, lens + 1, causal=False, dense=dense)

    def shifted_labels(self, plan: SegmentPlan, labels: torch.Tensor | None) -> torch.Tensor | None:
        """Decoder targets in content coordinates: ``[B, Tc]``, target of token c is token c+1 (-100 at ends)."""
        if labels is None or self.config.mode != "decoder":
            return None
        lab = labels.gather(1, plan.orig_pos)
        c = torch.arange(lab.shape[1], device=lab.device).view(1, -1)
        lab = torch.where(c < plan.lengths.view(-1, 1), lab, torch.full_like(lab, IGNORE_INDEX))
        return torch.cat([lab[:, 1:], torch.full_like(lab[:, :1], IGNORE_INDEX)], 1)

    # ---- one segment ----------------------------------------------------------------------------------
    def step(self, memory, content, shifted, params, width, want_logits, want_hidden, dense=False):
        """memory ``[B, m, d]`` -> (new memory, loss_sum, n_targets, logits, last hidden, hidden states)."""
        a, cfg = self.adapter, self.config
        m = cfg.num_mem_tokens
        read_offset = 0 if cfg.mode == "decoder" else 1
        ids, layout = self.segment_inputs(content, params, width, dense)
        write_offsets = params[2] if cfg.mode == "decoder" else None
        with rmt_attention(a.model, cfg.backend), segment_layout(layout):
            emb = a.embed(ids)
            _, x = segment_handoff(None, memory, None, emb, read_offset, write_offsets, backend=cfg.backend)
            h, out = a.run_segment(x, output_hidden_states=want_hidden)
        new_memory, _ = segment_handoff(h, memory, params[3], None, read_offset, None, backend=cfg.backend)
        loss_sum = h.new_zeros((), dtype=torch.float32)
        count = torch.zeros((), dtype=torch.long, device=h.device)
        logits = None
        hidden = out.hidden_states if want_hidden else None
        if a.head == "lm":
            tok_h = h[:, m:m + width]
            if shifted is not None or want_logits:
                logits = a.lm_logits(tok_h)
            if shifted is not None:
                targets = gather_span(shifted, params[0], params[1], width, IGNORE_INDEX)
                loss_sum = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                           ignore_index=IGNORE_INDEX, reduction="sum")
                count = (targets != IGNORE_INDEX).sum()
            if hidden is not None:
                hidden = tuple(s[:, m:m + width] for s in hidden)
            if not want_logits:
                logits = None
        elif a.head == "classifier":
            logits = out.logits
        return new_memory, loss_sum, count, logits, (h if a.mode == "encoder" else None), hidden

    # ---- the whole sequence ---------------------------------------------------------------------------
    def run(self, memory, plan: SegmentPlan, labels, keep_logits: bool, output_hidden_states: bool, progress=None):
        cfg = self.config
        shifted = self.shifted_labels(plan, labels)
        params = self.segment_params(plan)
        if (cfg.cuda_graphs and memory.is_cuda and not torch.is_grad_enabled() and not output_hidden_states):
            from .graphs import GraphedSegments

            if self.graphs is None:
                self.graphs = GraphedSegments(self)
            res = self.graphs.run(memory, plan, shifted, params, keep_logits, progress)
            if res is not None:
                return res
        return self.run_eager(memory, plan, shifted, params, keep_logits, output_hidden_states, progress)

    def run_eager(self, memory, plan, shifted, params, keep_logits, output_hidden_states, progress=None):
        cfg = self.config
        g_total = plan.num_segments
        depth = cfg.bptt_depth
        lens_host = plan.lens.tolist()  # one host sync for all segments
        widths = [max(row) for row in lens_host]
        dense = [min(row) == w for row, w in zip(lens_host, widths)]
        loss_sum = torch.zeros((), dtype=torch.float32, device=memory.device)
        count = torch.zeros((), dtype=torch.long, device=memory.device)
        dec_logits, dec_hidden = [], []
        final_logits = final_h = final_hidden = None
        rng = range(g_total) if progress is None else progress(range(g_total))
        for g in rng:
            if depth is not None and g > 0 and g < g_total - depth:
                memory = memory.detach()
            args = (memory, plan.content, shifted, params[g], widths[g], keep_logits, output_hidden_states, dense[g])
            if cfg.checkpoint_segments and torch.is_grad_enabled():
                outs = checkpoint(self.step, *args, use_reentrant=False)
            else:
                outs = self.step(*args)
            memory, seg_loss, seg_count, logits, h, hidden = outs
            loss_sum = loss_sum + seg_loss
            count = count + seg_count
            if cfg.mode == "decoder":
                if logits is not None:
                    dec_logits.append((g, logits))
                if hidden is not None:
                    dec_hidden.append((g, hidden))
            else:
                ends = params[g, 4].bool()
                final_logits = _record(final_logits, logits, ends)
                final_h = _record(final_h, h, ends)
                if hidden is not None:
                    final_hidden = hidden if final_hidden is None else tuple(
                        _record(o, n, ends) for o, n in zip(final_hidden, hidden))
        return dict(memory=memory, loss_sum=loss_sum, count=count, dec_logits=dec_logits, dec_hidden=dec_hidden,
                    final_logits=final_logits, final_h=final_h, final_hidden=final_hidden)


def _record(old, new, ends):
    """Keep ``new`` for rows that end in this segment, ``old`` for the others (pads the position dim)."""
    if new is None:
        return old
    if old is None:
        old = torch.zeros_like(new)
    if new.dim() == 3 and new.shape[1] != old.shape[1]:
        width = max(new.shape[1], old.shape[1])
        new = F.pad(new, (0, 0, 0, width - new.shape[1]))
        old = F.pad(old, (0, 0, 0, width - old.shape[1]))
    return torch.where(ends.view(-1, *([1] * (new.dim() - 1))), new, old)


def place_tokens(pieces, plan: SegmentPlan, total_len: int) -> torch.Tensor:
    """Scatter per-segment token outputs ``[(g, [B, W, ...])]`` back to the input's columns ``[B, T, ...]``."""
    g0, first = pieces[0]
    b = first.shape[0]
    out = first.new_zeros((b, total_len) + tuple(first.shape[2:]))
    rows = torch.arange(b, device=first.device).view(-1, 1)
    for g, piece in pieces:
        w = piece.shape[1]
        j = torch.arange(w, device=piece.device).view(1, -1)
        c = (plan.starts[g].view(-1, 1) + j).clamp(max=plan.orig_pos.shape[1] - 1)
        valid = j < plan.lens[g].view(-1, 1)
        cols = plan.orig_pos.gather(1, c)
        r, cc = rows.expand_as(cols)[valid], cols[valid]
        out = out.index_put((r, cc), piece[valid])
    return out
