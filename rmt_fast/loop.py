"""The segment loop: one place for what every schedule and executor does between two segments."""
from __future__ import annotations

import torch


def forward_segments(runner, memory, g_total: int, step, collect=None, cache=None, before=None,
                     progress=None) -> tuple:
    """The segment loop that every schedule and executor runs: eager full BPTT and inference
    (:meth:`SegmentRunner.run_eager`), the captured full-BPTT call (``rmt_fast.graphs.CallGraphs``) and the forward
    sweep of the two-sweep schedule (``rmt_fast.bptt``). For each segment ``g``: the memory (and short-term cache)
    entering it is cut from the graph where ``bptt_depth`` says, ``before(g, memory, cache)`` sees it,
    ``step(g, memory, cache)`` runs the segment (a ``StepResult``), its loss and target count are summed and
    ``collect(g, result)`` takes what it recorded. Returns ``(memory, cache, loss_sum, count)`` after the last."""
    cfg = runner.config
    loss_sum = torch.zeros((), dtype=torch.float32, device=memory.device)
    count = torch.zeros((), dtype=torch.long, device=memory.device)
    for g in (range(g_total) if progress is None else progress(range(g_total))):
        if cfg.cuts_memory_before(g, g_total):
            memory = memory.detach()
            cache = None if cache is None else cache.detach()
        if before is not None:
            before(g, memory, cache)
        res = step(g, memory, cache)
        memory, cache = res.memory, res.cache
        loss_sum = loss_sum + res.loss_sum
        count = count + res.count
        if collect is not None:
            collect(g, res)
    return memory, cache, loss_sum, count
