"""rmt_fast.graphs.ConcatRecord, what the call graphs record per-token outputs with (kept logits): for a call whose
every row fills every segment and keeps every input column, the segments' outputs side by side equal what the
eager path's TokenRecord scatters to the input columns. The GPU tests (test_gpu_training.py) compare whole
graphed and eager training calls."""
import pytest
import torch

import rmt_fast
from models import CLS, PAD, SEP, bert, gpt2, tokens
from rmt_fast.graphs import ConcatRecord
from rmt_fast.recurrence import compact_rows, plan_segments
from rmt_fast.schemes import TokenRecord


def _records(rmt, ids, keep, width):
    content, lengths, orig = compact_rows(ids, keep, 0)
    plan = plan_segments(content, lengths, orig, width, rmt.rmt_config.segment_alignment)
    params = rmt.runner.scheme.segment_params(plan)
    token, concat = TokenRecord(plan, ids.shape[1]), ConcatRecord()
    g = torch.Generator().manual_seed(0)
    for i in range(plan.num_segments):
        piece = torch.randn(ids.shape[0], width, 5, generator=g)
        token.add(params[i], piece)
        concat.add(params[i], piece)
    return plan, token.result(), concat.result()


def _wrap(kind):
    if kind == "decoder":  # segments aligned left
        return rmt_fast.wrap(gpt2(), num_mem_tokens=2, segment_size=8)
    return rmt_fast.wrap(bert(), num_mem_tokens=2, segment_size=8, cls_token_id=CLS, sep_token_id=SEP,
                         pad_token_id=PAD)  # an encoder's token outputs: segments aligned right


@pytest.mark.parametrize("kind", ["decoder", "encoder"])
@pytest.mark.parametrize("segments", [1, 3])
def test_concat_equals_token_record_for_full_calls(segments, kind):
    rmt = _wrap(kind)
    ids = tokens(3, 8 * segments, low=max(CLS, SEP, PAD) + 1)
    plan, token, concat = _records(rmt, ids, torch.ones_like(ids, dtype=torch.bool), 8)
    assert plan.content.shape[1] == ids.shape[1] and bool((plan.lens == 8).all())  # what SegmentRunner.run checks
    assert torch.equal(concat, token)


def test_a_padding_column_is_why_full_segments_are_not_enough():
    """Every segment full, but one input column is padding: TokenRecord keeps the input's columns (one more than
    the segments side by side); SegmentRunner.run leaves such calls to the eager path."""
    rmt = rmt_fast.wrap(gpt2(), num_mem_tokens=2, segment_size=8)
    ids = tokens(2, 17)
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[:, 0] = False
    plan, token, concat = _records(rmt, ids, keep, 8)
    assert bool((plan.lens == 8).all()) and plan.content.shape[1] == 16
    assert token.shape[1] == 17 and concat.shape[1] == 16
    assert torch.equal(token[:, 1:], concat)
