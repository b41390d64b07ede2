"""rmt_fast ops: one folder per op, each with its entry point that picks a backend.

- ``memory_attention/``: :func:`rmt_fast.ops.memory_attention.memory_attention`, softmax attention under the RMT
  segment mask.
- ``segment_handoff/``: :func:`rmt_fast.ops.segment_handoff.segment_handoff`, memory from one segment's last hidden
  states into the next segment's input.
- ``linear_cross_entropy/``: :func:`rmt_fast.ops.linear_cross_entropy.linear_cross_entropy`, the decoder loss
  without fp32 logits.

Each op folder holds its reference (plain PyTorch, the specification) beside the fused backends; the first two
register theirs as ``torch.library`` custom ops in the namespace ``rmt_fast`` and choose among :data:`BACKENDS`
by the rule of :mod:`rmt_fast.ops.backends`. An op's name here is its folder (``rmt_fast.ops.memory_attention`` is
the package, so ``rmt_fast.ops.memory_attention.triton`` is its Triton backend), and the function of the same name
inside it is the op.
"""
from __future__ import annotations

from . import memory_attention, segment_handoff
from .backends import BACKENDS, cuda_ext_available, resolve_backend, triton_available
from .memory_attention.spec import SegmentLayout

__all__ = ["SegmentLayout", "BACKENDS", "resolve_backend", "triton_available", "cuda_ext_available",
           "memory_attention", "segment_handoff"]
