"""Each op folder is reachable by its dotted path, as a user writes it (``import rmt_fast.ops.<op>.<module> as m``
and attribute access from ``rmt_fast.ops``), and its entry point is the function of the folder's name inside it."""
from __future__ import annotations

import importlib
import types

import pytest
import torch

import rmt_fast.ops
from op_backends import TRITON

OPS = ("memory_attention", "segment_handoff", "linear_cross_entropy")


@pytest.mark.parametrize("op", OPS)
def test_op_folder_is_a_package_and_holds_its_entry_point(op):
    importlib.import_module(f"rmt_fast.ops.{op}.reference")
    package = getattr(rmt_fast.ops, op)
    assert isinstance(package, types.ModuleType) and package.__name__ == f"rmt_fast.ops.{op}"
    assert package.reference is importlib.import_module(f"rmt_fast.ops.{op}.reference")
    entry = getattr(package, op)
    assert callable(entry) and entry.__module__ == package.__name__


def test_import_as_of_the_documented_paths():
    import rmt_fast.ops.linear_cross_entropy.reference as lce_reference
    import rmt_fast.ops.memory_attention.spec as spec
    import rmt_fast.ops.segment_handoff.reference as handoff_reference

    assert spec.SegmentLayout is rmt_fast.ops.SegmentLayout
    assert callable(handoff_reference.segment_handoff_ref)
    assert callable(lce_reference.linear_cross_entropy_ref)


@TRITON.marks[0]
def test_triton_backends_by_path():
    """``rmt_fast.ops.memory_attention.triton`` (named in the README) and the other ops' Triton modules."""
    import rmt_fast.ops.linear_cross_entropy.triton as lce
    import rmt_fast.ops.memory_attention.triton as attention
    import rmt_fast.ops.segment_handoff.triton as handoff

    assert rmt_fast.ops.memory_attention.triton is attention
    assert rmt_fast.ops.segment_handoff.triton is handoff
    assert rmt_fast.ops.linear_cross_entropy.triton is lce
    assert callable(attention.forward) and callable(handoff.gather_forward)


def test_backends_are_resolved_in_one_place():
    from rmt_fast.ops import backends

    assert rmt_fast.ops.resolve_backend is backends.resolve_backend
    assert rmt_fast.ops.BACKENDS == backends.BACKENDS == ("auto", "reference", "sdpa", "triton", "cuda")
    layout = rmt_fast.ops.SegmentLayout(1, 1, torch.tensor([2]), causal=True, memory_bidirectional=True)
    q = torch.zeros(1, 1, 4, 8)
    with pytest.raises(ValueError, match="backend must be one of"):
        rmt_fast.ops.memory_attention.memory_attention(q, q, q, layout, backend="flash")
    with pytest.raises(ValueError, match="backend must be one of"):
        rmt_fast.ops.segment_handoff.segment_handoff(None, q[0], None, q[0], 0, None, backend="flash")
