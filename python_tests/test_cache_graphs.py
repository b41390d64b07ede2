"""The short-term cache (``num_cache_tokens``) through the segment captures of rmt_fast.graphs, on the CPU: each
capture is replaced by a stand-in whose replay runs the captured body again and writes its results into the
capture's static outputs (what a CUDA graph replay does), so the static buffers that carry the cache between
segments, calls and capture variants are exercised as they are on a GPU. Inference steps and the two-sweep training
steps against eager runs: outputs, memory, the cache left behind and gradients. (python_tests/test_gpu_training.py
replays the real captures on a GPU.)"""
import pytest
import torch

import rmt_fast
import rmt_fast.graphs as graphs_mod
from models import gpt2, llama, tokens

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU stand-in (tensors that claim to be on "
                                "CUDA reach CUDA kernels on a GPU host); test_gpu_training.py runs the real captures")

DECODERS = {"gpt2": lambda: gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0), "llama": llama}


def _write(static, new) -> None:
    if isinstance(static, torch.Tensor):
        with torch.no_grad():
            static.copy_(new)
    elif isinstance(static, (tuple, list)):
        for s, n in zip(static, new):
            _write(s, n)


class Replayed:
    """A captured body: ``replay()`` runs it again and writes what it returns into the first run's tensors."""

    made = 0

    def __init__(self, body, result):
        self.body, self.result = body, result
        Replayed.made += 1

    def replay(self):
        _write(self.result, self.body())

    def pool(self):
        return None


def _record(body, pool=None):
    result = body()
    return Replayed(body, result), result


class _NoMeter:
    def __init__(self, device):
        pass

    def bytes(self):
        return 0


def _stand_in(monkeypatch, rmt):
    monkeypatch.setattr(graphs_mod, "record", _record)
    monkeypatch.setattr(graphs_mod, "warm_up", lambda device, body, iterations=2: [body() for _ in range(iterations)])
    monkeypatch.setattr(graphs_mod, "_PoolMeter", _NoMeter)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    rmt.runner.captures.budget_bytes = 1 << 40


def _pair(family, **kw):
    torch.manual_seed(0)
    state = DECODERS[family]().state_dict()
    made = []
    for graphs in (False, "auto"):
        model = DECODERS[family]()
        model.load_state_dict(state)
        rmt = rmt_fast.wrap(model, cuda_graphs=graphs, fused_kernels=False, **kw)  # no CUDA kernels
        rmt.memory.data.copy_(torch.linspace(-1, 1, rmt.memory.numel()).view_as(rmt.memory) * 0.02)
        made.append(rmt)
    return made


def _assert_cache_close(got, want):
    assert len(got.keys) == len(want.keys) and len(got.values) == len(want.values)
    for g, w in zip((*got.keys, *got.values), (*want.keys, *want.values)):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)
    assert torch.equal(got.lens, want.lens)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_inference_steps_carry_the_cache(monkeypatch, family):
    """Inference under no_grad: a batch whose second row is shorter (its last segments replay the ragged variant, the
    others the full one: the cache moves between the two captures' buffers), then a call that continues the first's
    memory and cache, then a fresh call of the same shape (the buffers start empty again)."""
    eager, graphed = _pair(family, num_mem_tokens=2, segment_size=6, num_cache_tokens=3)
    _stand_in(monkeypatch, graphed)
    ids = tokens(2, 23)
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    more = tokens(2, 12)
    with torch.no_grad():
        for rmt in (eager, graphed):
            first = rmt(ids, attention_mask=mask)
            second = rmt(more, memory=first.memory, short_term_cache=first.short_term_cache)
            fresh = rmt(more)
            rmt.results = (first, second, fresh)
    monkeypatch.undo()
    assert graphed.executor_counts() == {"inference graphed": 3}
    assert eager.executor_counts() == {"inference eager": 3}
    assert len(graphed.runner.captures.of_kind("inference")) == 2  # the full and the ragged step
    for got, want in zip(graphed.results, eager.results):
        torch.testing.assert_close(got.logits, want.logits, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(got.memory, want.memory, atol=1e-6, rtol=1e-5)
        _assert_cache_close(got.short_term_cache, want.short_term_cache)


@pytest.mark.parametrize("family,depth", [("gpt2", None), ("llama", None), ("gpt2", 1)])
def test_two_sweep_steps_carry_the_cache_and_its_gradient(monkeypatch, family, depth):
    """checkpoint_segments=True: the forward sweep's replays hand the cache from segment to segment, the backward
    sweep's replays take d(new cache) and give d(cache in) to the segment before (cut where ``bptt_depth`` cuts the
    memory). Loss, logits, the cache left behind and every parameter's gradient equal the eager two-sweep run's."""
    eager, graphed = _pair(family, num_mem_tokens=2, segment_size=6, num_cache_tokens=3, checkpoint_segments=True,
                           bptt_depth=depth)
    ids = tokens(2, 24)
    results = {}
    for name, rmt in (("eager", eager), ("graphed", graphed)):
        rmt.train()
        if rmt is graphed:
            _stand_in(monkeypatch, rmt)
        out = rmt(ids, labels=ids)
        params = [rmt.memory, *(p for p in rmt.model.parameters() if p.requires_grad)]
        grads = torch.autograd.grad(out.loss + out.logits.square().mean(), params)
        if rmt is graphed:
            monkeypatch.undo()
        results[name] = (out, grads)
    assert graphed.executor_counts() == {"two-sweep graphed": 1}
    (want, g_want), (got, g_got) = results["eager"], results["graphed"]
    torch.testing.assert_close(got.loss, want.loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-6, rtol=1e-5)
    _assert_cache_close(got.short_term_cache, want.short_term_cache)
    for g, w in zip(g_got, g_want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("depth", [None, 0])
def test_two_sweep_cache_gradient_reaches_earlier_segments(monkeypatch, depth):
    """Without memory slots the only path from segment 2's logits to segment 1's last tokens is the cache: the graphed
    backward sweep hands d(cache) back to segment 1 (a replay that dropped it would leave those embedding rows at
    zero), and drops it where ``bptt_depth=0`` cuts the graph."""
    torch.manual_seed(0)
    model = gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False)
    rmt = rmt_fast.wrap(model, num_mem_tokens=0, segment_size=6, num_cache_tokens=2, checkpoint_segments=True,
                        bptt_depth=depth, fused_kernels=False)
    _stand_in(monkeypatch, rmt)
    ids = torch.arange(10, 22).view(1, 12)
    out = rmt(ids)
    (g,) = torch.autograd.grad(out.logits[0, 6:].sum(), model.get_input_embeddings().weight)
    monkeypatch.undo()
    assert rmt.executor_counts() == {"two-sweep graphed": 1}
    reached = g[ids[0, :6]].abs().sum()  # segment 1's tokens
    assert reached > 0 if depth is None else reached == 0


def test_full_bptt_call_continuing_a_cache_with_its_gradient_runs_eagerly(monkeypatch):
    """A training call whose incoming short-term cache still carries the previous call's graph cannot be a captured
    call (a capture ends its graph at its inputs): it runs eagerly with one warning naming the fix, and its gradient
    reaches the previous call's parameters."""
    model = gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    rmt = rmt_fast.wrap(model, num_mem_tokens=2, segment_size=6, num_cache_tokens=3, fused_kernels=False).train()
    ids = tokens(2, 12)
    first = rmt(ids, labels=ids)  # eager (a CPU tensor)
    _stand_in(monkeypatch, rmt)
    monkeypatch.setattr(graphs_mod, "run_call_graphs", lambda *a, **k: pytest.fail("captured"))
    with pytest.warns(RuntimeWarning, match=r"short_term_cache=out.short_term_cache.detach\(\)"):
        second = rmt(ids, labels=ids, short_term_cache=first.short_term_cache)
    monkeypatch.undo()
    assert rmt.executor_counts() == {"full-BPTT eager": 2}
    (g,) = torch.autograd.grad(second.loss, rmt.memory)
    assert g.abs().sum() > 0


def test_two_sweep_steps_continue_a_detached_cache(monkeypatch):
    """The graphed two-sweep schedule continuing a previous call's memory and detached short-term cache: the first
    segment's capture loads that cache (not an empty one), as the eager sweeps read it."""
    eager, graphed = _pair("gpt2", num_mem_tokens=2, segment_size=6, num_cache_tokens=3, checkpoint_segments=True)
    ids = tokens(2, 24)
    results = {}
    for name, rmt in (("eager", eager), ("graphed", graphed)):
        rmt.train()
        with torch.no_grad():
            first = rmt(ids[:, :12])
        if rmt is graphed:
            _stand_in(monkeypatch, rmt)
        out = rmt(ids[:, 12:], labels=ids[:, 12:], memory=first.memory, short_term_cache=first.short_term_cache)
        grads = torch.autograd.grad(out.loss, [rmt.memory, *rmt.model.parameters()], allow_unused=True)
        if rmt is graphed:
            monkeypatch.undo()
        results[name] = (out, grads)
    assert graphed.executor_counts() == {"inference eager": 1, "two-sweep graphed": 1}
    (want, g_want), (got, g_got) = results["eager"], results["graphed"]
    torch.testing.assert_close(got.loss, want.loss, atol=1e-6, rtol=1e-5)
    _assert_cache_close(got.short_term_cache, want.short_term_cache)
    for g, w in zip(g_got, g_want):
        if w is None:
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-4)
