"""Context distillation: an auxiliary loss that asks the last segment's token states, read through the memory, to be
what they are when the whole input is one segment (encoder backbones).

On a memory task the answer's loss reaches the memory's write side only through its read side, and a question whose
answer needs a relation between two remembered facts ("What is north of the hub?") gives a gradient that asks for
both candidate places alike while the read side does not yet look for a direction (see
benchmarks/results/reproduction/README.md). Distillation gives both sides a dense target instead: the same model,
run without gradient on the whole row as ONE segment (the teacher: every fact visible to the question's tokens),
yields per-layer states of the last segment's tokens; the recurrent run (the student: the earlier segments only
through the memory) is asked to match them, layer by layer, in direction (``1 - cosine``). In the teacher, the
question's "north" attends to the fact that names the place north of the hub already in the first layers, so the
target tells the memory what to carry without waiting for the read side.

``loss = answer loss + coef * mean over layers 1..L and the last segment's tokens of (1 - cos(student, teacher))``

The teacher reads the last segment FIRST (``order="last_first"``, the default): its tokens then sit at the positions
they have in the student's segment, and the states differ by what the other segments add, not by where the tokens
are. With the row in its own order (``order="natural"``) most of the distance is the position: at the pretrained
MiniLM (reasoning, 2 x 48 tokens, fp32, 32 samples, 2026-12-07) the untrained student was 0.100 from the
natural-order teacher, of which 0.020 changes when the first segment's facts are another sample's; from the
last-first teacher 0.029, of which 0.013 does.

``layers="last"`` compares the last layer only: the student's call then records no per-layer states and runs on the
library's default executors (CUDA graphs on a GPU), as a plain training call does.

The teacher is the student's own weights (no copy, no gradient, dropout off), so the target follows the model as
it learns. Its segment is the whole row plus the layout's slots, so rows must fit the backbone's positions; it runs
eagerly. With ``layers="all"`` the student's call runs eagerly too (the CUDA-graph executors record the last layer
only); either way it is the library's own call, full BPTT over every segment, so DDP takes it as it takes a plain
training call.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .reconstruction import whole_segments

__all__ = ["LAYERS", "ORDERS", "check_distillation_fits", "distillation_step_loss", "teacher_states"]

LAYERS = ("all", "last")  # which layers' states are compared
ORDERS = ("last_first", "natural")  # where the teacher's segment puts the last segment's tokens


def _max_positions(rmt) -> int | None:
    return getattr(getattr(rmt.model, "config", None), "max_position_embeddings", None)


def check_distillation_fits(rmt, segment_size: int, num_segments: int) -> None:
    """Raise a ValueError naming ``distill_coef`` when a row of ``num_segments`` segments does not fit the backbone's
    positions as one segment (the teacher's)."""
    limit = _max_positions(rmt)
    need = num_segments * segment_size + rmt.runner.scheme.slots(rmt.rmt_config.num_mem_tokens)
    if limit is not None and need > limit:
        raise ValueError(f"distill_coef: the teacher reads a row of {num_segments} segments of {segment_size} tokens "
                         f"as one segment of {need} positions (with memory and special tokens); the backbone has "
                         f"{limit}. Use shorter segments or fewer segments per stage")


class _OneSegment:
    """The RMT reads each row as one segment of ``length`` tokens, eagerly, in eval mode, for the duration."""

    def __init__(self, rmt, length: int):
        self.rmt, self.length = rmt, length

    def __enter__(self):
        cfg = self.rmt.rmt_config
        self.saved = (cfg.segment_size, cfg.cuda_graphs, self.rmt.training)
        cfg.segment_size, cfg.cuda_graphs = self.length, False
        self.rmt.eval()
        return self

    def __exit__(self, *exc):
        cfg = self.rmt.rmt_config
        cfg.segment_size, cfg.cuda_graphs, training = self.saved
        self.rmt.train(training)
        return False


def _check(layers: str, order: str) -> None:
    if layers not in LAYERS:
        raise ValueError(f"layers: one of {', '.join(LAYERS)}, got {layers!r}")
    if order not in ORDERS:
        raise ValueError(f"order: one of {', '.join(ORDERS)}, got {order!r}")


def teacher_states(rmt, ids: torch.Tensor, segment_size: int, layers: str = "all", order: str = "last_first") -> tuple:
    """States of the last ``segment_size`` tokens of each row of ``ids [B, T]`` when the whole row is one segment,
    without gradient: ``layers="all"``: ``L + 1`` tensors ``[B, segment_size, d]``, embeddings first; ``"last"``:
    the last layer's alone (a tuple of one). ``order``: "last_first" (the segment holds those tokens first, then the
    rest of the row in its order) or "natural" (the row as it is)."""
    _check(layers, order)
    t = ids.shape[1]
    check_distillation_fits(rmt, segment_size, t // segment_size)
    span = rmt.runner.scheme.token_span(t)
    if order == "last_first":
        ids = torch.cat([ids[:, t - segment_size:], ids[:, :t - segment_size]], 1)
        last = slice(span.start, span.start + segment_size)
    else:
        last = slice(span.stop - segment_size, span.stop)
    with torch.no_grad(), _OneSegment(rmt, t):
        out = rmt(input_ids=ids, output_hidden_states=layers == "all", return_logits=False)
    hidden = out.hidden_states if layers == "all" else (out.last_hidden_state,)
    return tuple(h[:, last] for h in hidden)


def distillation_step_loss(rmt, ids: torch.Tensor, labels: torch.Tensor, segment_size: int, coef: float,
                           model=None, layers: str = "all", order: str = "last_first"):
    """``(total loss, answer loss, distillation loss)`` of one batch ``ids [B, n * segment_size]`` (every row exactly
    n >= 1 segments, as the memory tasks make them), ``labels [B]``. ``model``: what runs the student (the RMT, or
    the DDP module around it; default ``rmt``); ``layers``: "all" (1..L) or "last"; ``order``: the teacher's
    (:func:`teacher_states`). With one segment the student sees what the teacher sees, and the distillation loss
    measures only the student's dropout (0 without dropout)."""
    _check(layers, order)
    whole_segments(ids, labels, segment_size, "the distillation loss")
    target = teacher_states(rmt, ids, segment_size, layers, order)
    every = layers == "all"
    out = (model or rmt)(input_ids=ids, labels=labels, output_hidden_states=every, return_logits=False)
    span = rmt.runner.scheme.token_span(segment_size)
    student = [h[:, span] for h in (out.hidden_states if every else (out.last_hidden_state,))]
    if len(student) != len(target):
        raise RuntimeError(f"distillation: the student has {len(student)} layer states, the teacher {len(target)}")
    if every:  # layer 0 is the token embeddings (the same tokens; last_first: the same positions too)
        student, target = student[1:], target[1:]
    per_layer = [(1 - F.cosine_similarity(s.float(), q.float(), dim=-1)).mean() for s, q in zip(student, target)]
    distill = torch.stack(per_layer).mean()
    return out.loss + coef * distill, out.loss, distill
