"""CUDA-graph segment runner: one captured step per (batch, shape), replayed once per segment.

At small batch the eager recurrence waits on Python and kernel launches (measured on an H200: ~14.5 ms per GPT-2
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

from .schemes import P_GATHER


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    capacity: int
    content: torch.Tensor
    targets: torch.Tensor | None
    params: torch.Tensor
    memory: torch.Tensor
    loss_sum: torch.Tensor
    count: torch.Tensor
    output: object = None  # the segment's recorded output (static tensors written by every replay), or None


class GraphedSegments:
    """Captures and replays :meth:`SegmentRunner.step` for one model; see the module docstring."""

    def __init__(self, runner):
        self.runner = runner
        self.captured: dict[tuple, _Captured] = {}
        self.failed: set[tuple] = set()

    def _body(self, c: _Captured, want_output: bool):
        r = self.runner
        res = r.step(c.memory, c.content, c.targets, c.params, r.config.segment_size, want_output, False)
        c.memory.copy_(res.memory)
        c.loss_sum.add_(res.loss_sum)
        c.count.add_(res.count)
        return res.output

    def _capture(self, b: int, capacity: int, memory: torch.Tensor, want_output: bool, has_targets: bool,
                 content_dtype) -> _Captured:
        dev = memory.device
        params = torch.zeros(5, b, dtype=torch.long, device=dev)
        params[P_GATHER] = -1  # warm-up and capture run with every row idle: memory stays as it is
        c = _Captured(
            graph=torch.cuda.CUDAGraph(), capacity=capacity,
            content=torch.zeros(b, capacity, dtype=content_dtype, device=dev),
            targets=torch.full((b, capacity), -100, dtype=torch.long, device=dev) if has_targets else None,
            params=params, memory=memory.detach().clone(),
            loss_sum=torch.zeros((), dtype=torch.float32, device=dev),
            count=torch.zeros((), dtype=torch.long, device=dev))
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: lazy inits, autotuning, allocator
                self._body(c, want_output)
        torch.cuda.current_stream(dev).wait_stream(side)
        with torch.cuda.graph(c.graph):
            c.output = self._body(c, want_output)
        return c

    def run(self, memory, plan, targets, params, want_output: bool, total_len: int, progress=None):
        """Replay the captured step over every segment; returns the eager runner's result dict, or None when
        this shape cannot be captured (the caller then runs eagerly)."""
        b, tc = plan.content.shape
        key = (b, want_output, targets is not None, memory.dtype, memory.device)
        if key in self.failed:
            return None
        c = self.captured.get(key)
        if c is None or c.capacity < tc:
            capacity = max(tc, 2 * c.capacity if c is not None else tc)
            self.captured.pop(key, None)
            try:
                c = self._capture(b, capacity, memory, want_output, targets is not None, plan.content.dtype)
            except Exception as e:  # capture is impossible for this model/shape: run eagerly
                self.failed.add(key)
                warnings.warn(f"rmt_fast: CUDA graph capture failed ({type(e).__name__}: {e}); running eagerly",
                              RuntimeWarning, stacklevel=3)
                torch.cuda.synchronize()
                return None
            self.captured[key] = c
        c.content[:, :tc].copy_(plan.content)
        if targets is not None:
            c.targets[:, :tc].copy_(targets)
        c.memory.copy_(memory)
        c.loss_sum.zero_()
        c.count.zero_()
        record = self.runner.scheme.new_record(plan, total_len)
        g_total = plan.num_segments
        rng = range(g_total) if progress is None else progress(range(g_total))
        for g in rng:
            c.params.copy_(params[g])
            c.graph.replay()
            if c.output is not None:
                record.add(params[g], c.output)  # copies out of the static buffers before the next replay
        return dict(memory=c.memory.clone(), loss_sum=c.loss_sum.clone(), count=c.count.clone(),
                    output=record.result(), hidden=None)
