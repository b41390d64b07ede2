"""The segment loop, mode-free: plan the segments, then per segment place memory -> run backbone -> read memory.

Each row is segmented on its own (variable lengths come from ``attention_mask``; left or right padding). What a
segment looks like, where memory is read and written and what a segment records is the
:class:`~rmt_fast.schemes.Scheme`'s business. Rows without a segment at some step keep their memory.
"""
from __future__ import annotations

import collections

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.utils.checkpoint import checkpoint

from .adapters import Adapter
from .config import RMTConfig
from .bptt import fsdp_modules, run_two_sweep
from .graphs import CaptureCache
from .loop import forward_segments
from .ops.segment_handoff import segment_handoff
from .schemes import P_GATHER, Scheme
from .short_term_cache import SegmentCache, ShortTermCache


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


class StepResult(NamedTuple):
    """What one segment gives back: the next memory ``[B, m, d]``, the summed loss (fp32 scalar) and the number of
    targets it covers, the segment's recorded output (see the scheme), per-layer hidden states (on request) and the
    short-term cache for the next segment (None without one)."""

    memory: torch.Tensor
    loss_sum: torch.Tensor
    count: torch.Tensor
    output: torch.Tensor | None
    hidden: tuple | None
    cache: ShortTermCache | None = None


class SegmentRunner:
    """Runs the recurrence of one forward pass (eagerly, or through :mod:`rmt_fast.graphs` on CUDA)."""

    def __init__(self, adapter: Adapter, config: RMTConfig):
        self.adapter = adapter
        self.config = config
        self.scheme = Scheme.from_config(config, adapter.head)
        # how the short-term cache moves keys between segments (raises for families without a rule)
        self.cache_key_shift = adapter.cache_key_shift() if config.num_cache_tokens else None
        # every CUDA-graph capture of this model (inference steps, checkpointed training steps, full-BPTT calls)
        self.captures = CaptureCache()
        # what ran each call, by executor: "inference graphed", "inference eager", "two-sweep graphed",
        # "two-sweep eager", "full-BPTT graphed", "full-BPTT captured" (a capture, then its first replay) and
        # "full-BPTT eager"; read with RecurrentMemoryModel.executor_counts()
        self.calls: collections.Counter = collections.Counter()
        self.warned: set = set()  # the reasons for eager training calls already warned about (once each)

    def step(self, memory, content, targets, params, width, want_output, want_hidden, dense=False,
             cache: ShortTermCache | None = None) -> StepResult:
        """One segment: memory ``[B, m, d]`` (and the previous segment's short-term cache, None for none yet) ->
        :class:`StepResult`. params: the segment's ``[5, B]`` block."""
        a, s, backend = self.adapter, self.scheme, self.config.backend
        ids, layout = s.segment_inputs(content, params, width, dense)
        emb = a.embed(ids)
        _, x = segment_handoff(None, memory, None, emb, s.read_offset, s.write_offsets(params), backend=backend)
        layout, extra = self.with_cache(layout, cache)
        h, out = s.run_backbone(a, x, layout, backend, output_hidden_states=want_hidden, **extra)
        new_memory, _ = segment_handoff(h, memory, params[P_GATHER], None, s.read_offset, None, backend=backend)
        output, loss_sum, count = s.segment_outputs(a, h, out, targets, params, width, want_output)
        hidden = s.segment_hidden(out.hidden_states, width) if want_hidden else None
        return StepResult(new_memory, loss_sum, count, output, hidden, extra["rmt_cache"].result() if extra else None)

    def with_cache(self, layout, past: ShortTermCache | None) -> tuple:
        """``(layout, backbone keywords)`` of a segment call: without ``num_cache_tokens`` as given; with it the
        layout gains the cache as its key prefix and the keywords carry the :class:`SegmentCache` that the
        attention layers fill (``past``: the previous segment's cache, None for none)."""
        if not self.config.num_cache_tokens:
            return layout, {}
        segment_cache = SegmentCache(past, self.config.num_cache_tokens, self.cache_key_shift)
        return segment_cache.layout(layout), {"rmt_cache": segment_cache}

    # ---- the whole sequence ---------------------------------------------------------------------------
    def run(self, memory, plan: SegmentPlan, targets, keep_output: bool, output_hidden_states: bool, total_len: int,
            progress=None, cache: ShortTermCache | None = None) -> dict:
        """Every segment of ``plan`` from ``memory`` (and ``cache``: the short-term cache a previous call left, None
        for none). Returns ``dict(memory, loss_sum, count, output, hidden, cache)``: output is the scheme's record of
        the segment outputs, hidden a tuple of per-layer records (or None), cache the short-term cache the last
        segment leaves (None without ``num_cache_tokens``)."""
        cfg = self.config
        want_output = self.scheme.wants_output(keep_output)
        params = self.scheme.segment_params(plan)
        if cfg.graphs_enabled and memory.is_cuda and not torch.is_grad_enabled() and not output_hidden_states:
            from .graphs import run_inference_graphs

            res = run_inference_graphs(self, memory, plan, targets, params, want_output, total_len, progress, cache)
            if res is not None:
                self.calls["inference graphed"] += 1
                return res
        if cfg.checkpoint_segments and torch.is_grad_enabled() and not output_hidden_states:
            if cache is not None and any(t.requires_grad for t in (*cache.keys, *cache.values)):
                raise ValueError("short_term_cache: the two-sweep schedule (checkpoint_segments=True) does not take "
                                 "gradients back into a previous call's cache while training; pass "
                                 "short_term_cache=out.short_term_cache.detach(), or use checkpoint_segments=False")
            return run_two_sweep(self, memory, plan, targets, params, want_output, total_len, progress, cache)
        graded = torch.is_grad_enabled()
        lens_host = plan.lens.tolist()  # one host sync for all segments
        if (cfg.graphs_enabled and memory.is_cuda and graded and not output_hidden_states
                and not (want_output and self.scheme.output_per_segment and plan.content.shape[1] != total_len)
                and not fsdp_modules(self.adapter.model)):  # FSDP2 swaps parameters in and out around its modules
            # Per-token outputs (a decoder's logits) are captured only where every input column is a content token:
            # with every segment full too (run_call_graphs' condition), the record is the segments side by side.
            from .graphs import run_call_graphs, warn_eager_once

            if cache is not None and any(t.requires_grad for t in (*cache.keys, *cache.values)):
                warn_eager_once(self, "cache with gradient", "a full-BPTT training call that continues a previous "
                                "call's short-term cache with its gradient runs eagerly (a captured call ends its "
                                "graph at its inputs); pass short_term_cache=out.short_term_cache.detach() to "
                                "replay CUDA graphs")
            else:
                res = run_call_graphs(self, memory, plan, targets, params, want_output, lens_host, cache)
                if res is not None:
                    return res
        self.calls["full-BPTT eager" if graded else "inference eager"] += 1
        return self.run_eager(memory, plan, targets, params, want_output, output_hidden_states, total_len,
                              lens_host, progress, cache)

    def run_eager(self, memory, plan, targets, params, want_output, output_hidden_states, total_len, lens_host,
                  progress=None, cache: ShortTermCache | None = None):
        """Every segment eagerly; ``lens_host``: ``plan.lens`` read to the host (segment widths and layouts);
        ``cache``: the short-term cache entering the first segment."""
        widths = [max(row) for row in lens_host]
        dense = [min(row) == w for row, w in zip(lens_host, widths)]
        record = self.scheme.new_record(plan, total_len)
        hidden_records = []
        per_segment_checkpoints = self.config.checkpoint_segments and torch.is_grad_enabled()  # with hidden states

        def step(g, memory, cache):
            args = (memory, plan.content, targets, params[g], widths[g], want_output, output_hidden_states, dense[g],
                    cache)
            if per_segment_checkpoints:
                return StepResult(*checkpoint(self.step, *args, use_reentrant=False))
            return self.step(*args)

        def collect(g, res):
            if res.output is not None:
                record.add(params[g], res.output)
            if res.hidden is not None:
                if not hidden_records:
                    hidden_records.extend(self.scheme.new_record(plan, total_len) for _ in res.hidden)
                for r, hs in zip(hidden_records, res.hidden):
                    r.add(params[g], hs)

        memory, cache, loss_sum, count = forward_segments(self, memory, plan.num_segments, step, collect, cache,
                                                          progress=progress)
        hidden = tuple(r.result() for r in hidden_records) if hidden_records else None
        return dict(memory=memory, loss_sum=loss_sum, count=count, output=record.result(), hidden=hidden,
                    cache=cache)
