"""Data-parallel training without per-segment collectives.

``torch.nn.parallel.DistributedDataParallel`` reduces a parameter's gradient when its ``AccumulateGrad`` fires.
The two-sweep schedule (``checkpoint_segments=True``, :mod:`rmt_fast.bptt`) backpropagates one segment at a time
inside ``loss.backward()`` (and, graphed, adds the gradients at the end), so those hooks would fire once per
segment, or not at all. Instead, run the model without the DDP wrapper and reduce once per optimizer step::

    broadcast_parameters(rmt)            # once, as DDP does at construction
    loss = rmt(ids, labels=labels).loss  # this rank's share of the global batch
    loss.backward()
    all_reduce_gradients(rmt)            # one bucketed all-reduce per dtype: the mean over ranks
    optimizer.step()
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def broadcast_parameters(module: torch.nn.Module, src: int = 0, group=None) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank (DDP's start)."""
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src, group=group)


def all_reduce_gradients(module: torch.nn.Module, group=None, bucket_bytes: int = 64 << 20) -> None:
    """Replace every ``.grad`` of ``module`` by its mean over the ranks of ``group``; parameters without a
    gradient on this rank count as zeros (every rank must call this for the same module, in the same order)."""
    world = dist.get_world_size(group)
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: dict = {}
    for p in params:
        by_dtype.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    for grads in by_dtype.values():
        bucket, size = [], 0
        for g in grads + [None]:
            if g is not None:
                bucket.append(g)
                size += g.numel() * g.element_size()
            if bucket and (g is None or size >= bucket_bytes):
                flat = _flatten_dense_tensors(bucket)
                dist.all_reduce(flat, group=group)
                flat /= world
                for dst, src in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                    dst.copy_(src)
                bucket, size = [], 0
