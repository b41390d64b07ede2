"""The cache policy of full-BPTT training captures (rmt_fast.graphs.run_call_graphs) on the CPU: the captures
themselves are replaced by stand-ins (a real capture needs CUDA; python_tests/test_gpu_training.py runs those),
so what is tested is which call shapes get captured, replayed, evicted or run eagerly, and the byte budget."""
import collections
import types

import pytest
import torch

import rmt_fast
import rmt_fast.graphs as graphs_mod
from rmt_fast.graphs import make_room

SEG = 4


class FakeCapture:
    """Stands in for CallGraphs: pool bytes proportional to batch x segments, a pending flag."""

    made = []

    def __init__(self, runner, b, g_total, memory, want_output, targets, dtype, autocast):
        self.pool_bytes = 100 * b * g_total
        self.g_total = g_total
        self.pending = False
        self.parameters = []
        self.structure = None
        FakeCapture.made.append(g_total)

    def available(self):
        return not self.pending

    def load(self, *args):
        pass


class FakeApply:
    @staticmethod
    def apply(graphs, memory, *parameters):
        z = torch.zeros(())
        return memory, z, z


@pytest.fixture
def runner(monkeypatch):
    monkeypatch.setattr(graphs_mod, "CallGraphs", FakeCapture)
    monkeypatch.setattr(graphs_mod, "_GraphedCall", FakeApply)
    FakeCapture.made = []
    model = torch.nn.Linear(2, 2)
    return types.SimpleNamespace(config=types.SimpleNamespace(segment_size=SEG, bptt_depth=None),
                                 adapter=types.SimpleNamespace(model=model), call_graphs={},
                                 calls=collections.Counter(), warned=set())


def _call(runner, g_total, b=2):
    memory = torch.zeros(b, 1, 2)
    plan = types.SimpleNamespace(content=torch.zeros(b, g_total * SEG, dtype=torch.long), num_segments=g_total)
    params = torch.zeros(g_total, 5, b, dtype=torch.long)
    res = graphs_mod.run_call_graphs(runner, memory, plan, None, params, False, [[SEG] * g_total] * b)
    if res is None:  # (SegmentRunner.run counts the eager call it then makes)
        runner.calls["full-BPTT eager"] += 1
    return res


def test_mixed_lengths_keep_one_capture_each_within_the_budget(runner):
    runner.call_graphs["budget_bytes"] = 10_000  # the stand-in pools: 200 bytes per segment at b=2
    lengths = [1, 2, 3, 4, 5] * 6
    for n in lengths:
        _call(runner, n)
    # each length: eager on its first call, captured on its second, replayed from then on; never captured again
    assert sorted(FakeCapture.made) == [1, 2, 3, 4, 5]
    assert runner.calls == {"full-BPTT eager": 5, "full-BPTT captured": 5, "full-BPTT graphed": 20}
    assert list(runner.call_graphs["captured"])[-1][2] == 5  # most recently used last


def test_a_small_budget_evicts_the_least_recently_used_and_gives_up_after_recaptures(runner):
    runner.call_graphs["budget_bytes"] = 900  # room for 4.5 segments' pools at b=2
    for n in [1, 2, 1, 2]:
        _call(runner, n)
    assert FakeCapture.made == [1, 2] and len(runner.call_graphs["captured"]) == 2  # 200 + 400 bytes fit
    _call(runner, 4)
    _call(runner, 4)  # 800 bytes: the two older captures make room
    assert [k[2] for k in runner.call_graphs["captured"]] == [4]
    with pytest.warns(RuntimeWarning, match="captured 3 times") as record:
        for _ in range(10):  # 1 and 4 alternate: each evicts the other until both were captured MAX_RECAPTURES times
            _call(runner, 1)
            _call(runner, 4)
    assert len([w for w in record if "captured 3 times" in str(w.message)]) == 1  # once per model
    assert FakeCapture.made.count(1) == FakeCapture.made.count(4) == graphs_mod.MAX_RECAPTURES
    assert runner.calls["full-BPTT eager"] > 0 and runner.calls["full-BPTT graphed"] > 0


def test_a_capture_waiting_for_its_backward_is_not_evicted(runner):
    runner.call_graphs["budget_bytes"] = 500
    _call(runner, 2)
    _call(runner, 2)
    (only,) = runner.call_graphs["captured"].values()
    only.pending = True
    _call(runner, 1)
    with pytest.warns(RuntimeWarning, match="still waits for its backward"):
        assert _call(runner, 1) is None  # no room: the pending capture stays, this call runs eagerly
    assert list(runner.call_graphs["captured"].values()) == [only]
    only.pending = False
    assert _call(runner, 1) is not None  # now it makes room
    assert [k[2] for k in runner.call_graphs["captured"]] == [1]


def test_make_room():
    class C:
        def __init__(self, n, free=True):
            self.pool_bytes, self.free = n, free

        def available(self):
            return self.free

    cache = {"a": C(300), "b": C(300, free=False), "c": C(300)}
    assert make_room(cache, 100, 1000) and list(cache) == ["a", "b", "c"]
    assert make_room(cache, 400, 1000) and list(cache) == ["b", "c"]
    assert not make_room(cache, 800, 1000) and list(cache) == ["b"]
    assert make_room({}, 10**12, 0)  # an empty cache takes one capture of any size


def test_set_capture_memory_and_drop_captures():
    import sys, os

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from models import gpt2

    rmt = rmt_fast.wrap(gpt2(), num_mem_tokens=2, segment_size=8)
    rmt.set_capture_memory(1 << 30)
    assert rmt.runner.call_graphs["budget_bytes"] == 1 << 30
    rmt.set_capture_memory(None)
    assert rmt.runner.call_graphs["budget_bytes"] is None
    for bad in (-1, 1.5, True, "1G"):
        with pytest.raises(ValueError, match="max_bytes"):
            rmt.set_capture_memory(bad)
    rmt.runner.call_graphs.update(captured={"k": object()}, seen={"k": 2})
    rmt.runner.segment_training_graphs["t"] = object()
    rmt.drop_captures()
    r = rmt.runner
    assert "captured" not in r.call_graphs and not r.segment_training_graphs and r.inference_graphs is None


def test_captures_do_not_keep_the_model_alive():
    """The captures hold their runner weakly: deleting the model frees it (and on CUDA the graphs' pools) by
    reference counting alone, with Python's cyclic collector off."""
    import gc
    import os
    import sys
    import weakref

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from models import gpt2

    gc.collect()
    gc.disable()
    try:
        rmt = rmt_fast.wrap(gpt2(), num_mem_tokens=2, segment_size=8)
        # as the first CUDA inference call builds it
        rmt.runner.inference_graphs = graphs_mod.SegmentInferenceGraphs(rmt.runner)
        assert rmt.runner.inference_graphs.runner.config is rmt.runner.config
        runner, backbone = weakref.ref(rmt.runner), weakref.ref(rmt.runner.adapter.model)
        del rmt
        assert runner() is None and backbone() is None
    finally:
        gc.enable()


def test_two_sweep_with_kept_logits_warns_once_that_it_trains_eagerly(monkeypatch):
    """On CUDA with graphs on, checkpoint_segments=True keeping a decoder's per-token logits runs eagerly: one
    warning names keep_logits=False. (The CPU stands in: the tensors claim to be on CUDA for the check.)"""
    import os
    import sys

    import rmt_fast.bptt as bptt

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from models import gpt2, tokens

    rmt = rmt_fast.wrap(gpt2(), num_mem_tokens=2, segment_size=8, checkpoint_segments=True, cuda_graphs=True)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(bptt, "_segment_training_graphs", lambda *a: pytest.fail("a capture was attempted"))
    ids = tokens(2, 20)
    with pytest.warns(RuntimeWarning, match="keep_logits=False") as record:
        for _ in range(2):
            rmt(ids, labels=ids).loss.backward()
    assert len([w for w in record if "keep_logits=False" in str(w.message)]) == 1
    assert rmt.executor_counts() == {"two-sweep eager": 2}
