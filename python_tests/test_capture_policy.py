"""The capture cache's policy (rmt_fast.graphs.CaptureCache, used by run_call_graphs, the checkpointed schedule and
inference) on the CPU: the captures themselves are replaced by stand-ins (a real capture needs CUDA;
python_tests/test_gpu_training.py and test_gpu.py run those), so what is tested is which call shapes get captured,
replayed, evicted or run eagerly, and the byte budget all kinds share."""
import collections
import types

import pytest
import torch

import rmt_fast
import rmt_fast.graphs as graphs_mod
from rmt_fast.graphs import CaptureCache

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
        self.num_outputs = self.cache_layers = 0
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
                                 adapter=types.SimpleNamespace(model=model), captures=CaptureCache(),
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
    runner.captures.budget_bytes = 10_000  # the stand-in pools: 200 bytes per segment at b=2
    lengths = [1, 2, 3, 4, 5] * 6
    for n in lengths:
        _call(runner, n)
    # each length: eager on its first call, captured on its second, replayed from then on; never captured again
    assert sorted(FakeCapture.made) == [1, 2, 3, 4, 5]
    assert runner.calls == {"full-BPTT eager": 5, "full-BPTT captured": 5, "full-BPTT graphed": 20}
    assert list(runner.captures.entries)[-1][2] == 5  # most recently used last


def test_a_small_budget_evicts_the_least_recently_used_and_gives_up_after_recaptures(runner):
    runner.captures.budget_bytes = 900  # room for 4.5 segments' pools at b=2
    for n in [1, 2, 1, 2]:
        _call(runner, n)
    assert FakeCapture.made == [1, 2] and len(runner.captures) == 2  # 200 + 400 bytes fit
    _call(runner, 4)
    _call(runner, 4)  # 800 bytes: the two older captures make room
    assert [k[2] for k in runner.captures.entries] == [4]
    with pytest.warns(RuntimeWarning, match="captured 3 times") as record:
        for _ in range(10):  # 1 and 4 alternate: each evicts the other until both were captured MAX_RECAPTURES times
            _call(runner, 1)
            _call(runner, 4)
    assert len([w for w in record if "captured 3 times" in str(w.message)]) == 1  # once per model
    assert FakeCapture.made.count(1) == FakeCapture.made.count(4) == graphs_mod.MAX_RECAPTURES
    assert runner.calls["full-BPTT eager"] > 0 and runner.calls["full-BPTT graphed"] > 0


def test_a_capture_waiting_for_its_backward_is_not_evicted(runner):
    runner.captures.budget_bytes = 500
    _call(runner, 2)
    _call(runner, 2)
    (only,) = runner.captures.entries.values()
    only.pending = True
    _call(runner, 1)
    with pytest.warns(RuntimeWarning, match="still waits for its backward"):
        assert _call(runner, 1) is None  # no room: the pending capture stays, this call runs eagerly
    assert list(runner.captures.entries.values()) == [only]
    only.pending = False
    assert _call(runner, 1) is not None  # now it makes room
    assert [k[2] for k in runner.captures.entries] == [1]


class Stub:
    def __init__(self, n, free=True):
        self.pool_bytes, self.free = n, free

    def available(self):
        return self.free


def test_make_room():
    cache = CaptureCache()
    cache.entries.update(a=Stub(300), b=Stub(300, free=False), c=Stub(300))
    assert cache.make_room(100, 1000) and list(cache.entries) == ["a", "b", "c"]
    assert cache.make_room(400, 1000) and list(cache.entries) == ["b", "c"]
    assert not cache.make_room(800, 1000) and list(cache.entries) == ["b"]
    assert CaptureCache().make_room(10**12, 0)  # an empty cache takes one capture of any size


def test_one_budget_for_every_kind_and_least_recently_used_first():
    """Segment captures (inference, checkpointed training) and whole-call captures share one byte budget; a get
    makes a capture the most recently used; a new capture's room is estimated from the largest pool per unit (rows x
    segments) seen for its kind."""
    cache = CaptureCache(budget_bytes=1000)
    dev = torch.device("cpu")
    assert cache.build(("inference", 1), lambda: Stub(200), dev, 2, "x") is not None
    assert cache.build(("segment training", 1), lambda: Stub(300), dev, 2, "x") is not None
    assert cache.build(("call", 1), lambda: Stub(400), dev, 4, "x") is not None
    assert cache.held() == 900 and cache.unit_bytes == {"inference": 100, "segment training": 150, "call": 100}
    assert [len(cache.of_kind(k)) for k in ("inference", "segment training", "call")] == [1, 1, 1]
    cache.get(("inference", 1))  # now the most recently used
    assert cache.build(("call", 2), lambda: Stub(400), dev, 4, "x") is not None  # estimate 400: drops the LRU
    assert list(cache.entries) == [("call", 1), ("inference", 1), ("call", 2)]
    cache.clear()
    assert len(cache) == 0 and not cache.unit_bytes and cache.budget_bytes == 1000


def test_a_failing_capture_is_tried_again_then_runs_eagerly_for_good(monkeypatch):
    monkeypatch.setattr(graphs_mod, "recover_from_failed_capture", lambda device: None)
    cache = CaptureCache(budget_bytes=1000)
    tries = []

    def fail():
        tries.append(1)
        raise RuntimeError("operation not permitted when stream is capturing")

    with pytest.warns(RuntimeWarning, match="capture of the step failed .*RuntimeError: operation not permitted"):
        assert cache.build(("inference", 1), fail, torch.device("cpu"), 1, "the step") is None
    assert len(tries) == graphs_mod.CAPTURE_ATTEMPTS and ("inference", 1) in cache.failed
    assert cache.build(("inference", 1), lambda: Stub(1), torch.device("cpu"), 1, "the step") is None  # not retried
    flaky = iter([RuntimeError("once"), None])

    def once():
        e = next(flaky)
        if e is not None:
            raise e
        return Stub(5)

    assert cache.build(("inference", 2), once, torch.device("cpu"), 1, "the step") is not None  # second attempt


def test_set_capture_memory_and_drop_captures():
    import sys, os

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from models import gpt2

    rmt = rmt_fast.wrap(gpt2(), num_mem_tokens=2, segment_size=8)
    rmt.set_capture_memory(1 << 30)
    assert rmt.runner.captures.budget_bytes == 1 << 30
    rmt.set_capture_memory(None)
    assert rmt.runner.captures.budget_bytes is None
    for bad in (-1, 1.5, True, "1G"):
        with pytest.raises(ValueError, match="max_bytes"):
            rmt.set_capture_memory(bad)
    rmt.runner.captures.entries.update({("call", 1): Stub(1), ("inference", 1): Stub(1)})
    rmt.runner.captures.seen[("call", 1)] = 2
    rmt.drop_captures()
    assert len(rmt.runner.captures) == 0 and not rmt.runner.captures.seen


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
        # what a capture holds of its runner (SegmentInferenceGraphs, SegmentTrainingGraphs and CallGraphs alike)
        holder = types.SimpleNamespace(runner=graphs_mod.weak_runner(rmt.runner), pool_bytes=0,
                                       available=lambda: True)
        rmt.runner.captures.entries[("inference", 1)] = holder
        assert holder.runner.config is rmt.runner.config
        runner, backbone = weakref.ref(rmt.runner), weakref.ref(rmt.runner.adapter.model)
        del rmt
        assert runner() is None and backbone() is None
    finally:
        gc.enable()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU stand-in (tensors that claim to be on CUDA reach CUDA "
                    "kernels on a GPU host); test_gpu_training.py runs the real captures there")
def test_two_sweep_with_kept_logits_asks_for_captures(monkeypatch):
    """On CUDA with graphs on, checkpoint_segments=True keeping a decoder's per-token logits replays segment captures
    like keep_logits=False; where they cannot be made the call runs the eager sweeps. (The CPU stands in: the tensors
    claim to be on CUDA for the check, and no capture can be made.)"""
    import os
    import sys

    import rmt_fast.bptt as bptt

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from models import gpt2, tokens

    rmt = rmt_fast.wrap(gpt2(), num_mem_tokens=2, segment_size=8, checkpoint_segments=True, cuda_graphs=True)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    asked = []
    monkeypatch.setattr(bptt, "_segment_training_graphs", lambda *a: asked.append(a[-1]))
    ids = tokens(2, 20)
    for _ in range(2):
        out = rmt(ids, labels=ids)
        out.loss.backward()
    assert out.logits.shape[:2] == ids.shape
    assert asked == [True, False, True, False] or sorted(asked) == [False, False, True, True]
    assert rmt.executor_counts() == {"two-sweep eager": 2}


def test_train_and_eval_modes_never_share_a_capture(runner):
    """A capture bakes in what the modules' modes decide (dropout): train() and eval() switched between calls select
    different captures, each captured on its own second call."""
    runner.captures.budget_bytes = 10_000
    model = runner.adapter.model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    for mode in ("train", "train", "eval", "eval", "train", "eval"):
        getattr(model, mode)()
        _call(runner, 2)
    assert FakeCapture.made == [2, 2]
    assert runner.calls == {"full-BPTT eager": 2, "full-BPTT captured": 2, "full-BPTT graphed": 2}
    model[1].eval()  # one submodule's mode is part of the key too
    model.train()
    model[1].eval()
    _call(runner, 2)
    assert runner.calls["full-BPTT eager"] == 3


def test_module_modes():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    modes = {graphs_mod.module_modes(model)}
    model.eval()
    modes.add(graphs_mod.module_modes(model))
    model[1].train()
    modes.add(graphs_mod.module_modes(model))
    assert len(modes) == 3 and graphs_mod.module_modes(model.eval()) == 0


def test_segment_captures_grow_their_token_columns():
    """A segment capture serves every call length up to its capacity; a longer call re-captures at twice the old
    capacity (or the call's columns, if more), replacing the old capture."""
    cache = CaptureCache(budget_bytes=10_000)
    made = []

    def make(capacity):
        made.append(capacity)
        c = Stub(10)
        c.capacity = capacity
        return c

    dev = torch.device("cpu")
    first = cache.sized(("inference", 1), 40, make, dev, 1, "x")
    assert cache.sized(("inference", 1), 32, make, dev, 1, "x") is first and made == [40]
    cache.sized(("inference", 1), 48, make, dev, 1, "x")
    cache.sized(("inference", 1), 400, make, dev, 1, "x")
    assert made == [40, 80, 400] and len(cache) == 1
