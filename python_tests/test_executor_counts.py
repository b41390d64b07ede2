"""RecurrentMemoryModel.executor_counts: which executor ran each forward call (CPU: the eager ones)."""
import os
import sys

import pytest
import torch

import rmt_fast

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models import gpt2  # noqa: E402


def test_counts_each_call_once_by_executor_and_resets():
    torch.manual_seed(0)
    ids = torch.randint(4, 90, (2, 20))
    rmt = rmt_fast.wrap(gpt2(), num_mem_tokens=2, segment_size=8)
    assert rmt.executor_counts() == {}
    for _ in range(3):
        rmt(ids, labels=ids).loss.backward()
    with torch.no_grad():
        rmt(ids)
    assert rmt.executor_counts() == {"full-BPTT eager": 3, "inference eager": 1}
    assert rmt.executor_counts(reset=True) == {"full-BPTT eager": 3, "inference eager": 1}
    assert rmt.executor_counts() == {}

    two = rmt_fast.wrap(gpt2(), num_mem_tokens=2, segment_size=8, checkpoint_segments=True, keep_logits=False)
    two(ids, labels=ids).loss.backward()
    assert two.executor_counts() == {"two-sweep eager": 1}


def test_reset_must_be_a_bool():
    rmt = rmt_fast.wrap(gpt2(), num_mem_tokens=2, segment_size=8)
    with pytest.raises(TypeError, match="reset must be a bool"):
        rmt.executor_counts(reset="yes")
