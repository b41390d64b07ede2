"""CUDA-graph segment runner: one captured step per (batch, shape), replayed once per segment.

At small batch the eager recurrence waits on Python and kernel launches (PERFORMANCE.md: ~14.5 ms per GPT-2
segment eager vs ~4.2 ms graphed). Here the whole step (segment ids, embedding, memory placement, backbone,
memory read, decoder loss or classifier record) is captured once into a CUDA graph over static buffers; per
segment the host copies one ``[5, B]`` parameter block and replays. Every segment runs at the full width
(the ragged last segment is padded into the same bucket), so one graph serves the whole sequence.

Used for inference (``torch.no_grad``) when ``cuda_graphs=True``; if capture fails, one warning and the eager
path runs instead (same results).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    capacity: int
    content: torch.Tensor
    shifted: torch.Tensor | None
    params: torch.Tensor
    memory: torch.Tensor
    loss_sum: torch.Tensor
    count: torch.Tensor
    logits: torch.Tensor | None = None  # decoder logits of the current segment (static output)
    final_logits: torch.Tensor | None = None  # classifier logits of each row's last segment
    final_h: torch.Tensor | None = None  # bare encoder: last segment's states


class GraphedSegments:
    """Captures and replays :meth:`SegmentRunner.step` for one model; see the module docstring."""

    def __init__(self, runner):
        self.runner = runner
        self.captured: dict[tuple, _Captured] = {}
        self.failed: set[tuple] = set()

    def _body(self, c: _Captured, keep_logits: bool):
        r = self.runner
        width = r.config.segment_size
        new_mem, loss, count, logits, h, _ = r.step(c.memory, c.content, c.shifted, c.params, width, keep_logits,
                                                    False)
        c.memory.copy_(new_mem)
        c.loss_sum.add_(loss)
        c.count.add_(count)
        if r.config.mode == "encoder":
            ends = c.params[4].bool()
            if logits is not None:
                c.final_logits.copy_(torch.where(ends.view(-1, 1), logits, c.final_logits))
            if c.final_h is not None:
                c.final_h.copy_(torch.where(ends.view(-1, 1, 1), h, c.final_h))
        return logits

    def _capture(self, b: int, capacity: int, memory: torch.Tensor, keep_logits: bool, has_targets: bool,
                 content_dtype) -> _Captured:
        r = self.runner
        cfg, a = r.config, r.adapter
        dev = memory.device
        params = torch.zeros(5, b, dtype=torch.long, device=dev)
        params[3] = -1  # warm-up and capture run with every row idle: memory stays as it is
        c = _Captured(
            graph=torch.cuda.CUDAGraph(), capacity=capacity,
            content=torch.zeros(b, capacity, dtype=content_dtype, device=dev),
            shifted=torch.full((b, capacity), -100, dtype=torch.long, device=dev) if has_targets else None,
            params=params, memory=memory.detach().clone(),
            loss_sum=torch.zeros((), dtype=torch.float32, device=dev),
            count=torch.zeros((), dtype=torch.long, device=dev))
        if cfg.mode == "encoder":
            if a.head == "classifier":
                c.final_logits = torch.zeros(b, a.model.config.num_labels, dtype=memory.dtype, device=dev)
            elif a.head == "none":
                n = cfg.segment_size + cfg.slots_per_segment
                c.final_h = torch.zeros(b, n, memory.shape[-1], dtype=memory.dtype, device=dev)
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: lazy inits, autotuning, allocator
                self._body(c, keep_logits)
        torch.cuda.current_stream(dev).wait_stream(side)
        with torch.cuda.graph(c.graph):
            c.logits = self._body(c, keep_logits)
        return c

    def run(self, memory, plan, shifted, params, keep_logits: bool, progress=None):
        """Replay the captured step over every segment; returns the eager runner's result dict, or None when
        this shape cannot be captured (the caller then runs eagerly)."""
        b, tc = plan.content.shape
        key = (b, keep_logits, shifted is not None, memory.dtype, memory.device)
        if key in self.failed:
            return None
        c = self.captured.get(key)
        if c is None or c.capacity < tc:
            capacity = max(tc, 2 * c.capacity if c is not None else tc)
            self.captured.pop(key, None)
            try:
                c = self._capture(b, capacity, memory, keep_logits, shifted is not None, plan.content.dtype)
            except Exception as e:  # capture is impossible for this model/shape: run eagerly
                self.failed.add(key)
                warnings.warn(f"rmt_fast: CUDA graph capture failed ({type(e).__name__}: {e}); running eagerly",
                              RuntimeWarning, stacklevel=3)
                torch.cuda.synchronize()
                return None
            self.captured[key] = c
        c.content[:, :tc].copy_(plan.content)
        if shifted is not None:
            c.shifted[:, :tc].copy_(shifted)
        c.memory.copy_(memory)
        c.loss_sum.zero_()
        c.count.zero_()
        for t in (c.final_logits, c.final_h):
            if t is not None:
                t.zero_()
        dec_logits = []
        g_total = plan.num_segments
        rng = range(g_total) if progress is None else progress(range(g_total))
        for g in rng:
            c.params.copy_(params[g])
            c.graph.replay()
            if keep_logits and c.logits is not None and self.runner.config.mode == "decoder":
                dec_logits.append((g, c.logits.clone()))
        return dict(memory=c.memory.clone(), loss_sum=c.loss_sum.clone(), count=c.count.clone(),
                    dec_logits=dec_logits, dec_hidden=[],
                    final_logits=None if c.final_logits is None else c.final_logits.clone(),
                    final_h=None if c.final_h is None else c.final_h.clone(), final_hidden=None)
