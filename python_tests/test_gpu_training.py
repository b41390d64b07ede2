"""GPU-only: graphed checkpointed training (rmt_fast.graphs.SegmentTrainingGraphs) against the eager two-sweep schedule
and full BPTT. Graphs change speed, never results."""
from contextlib import nullcontext

import pytest
import torch

import rmt_fast
from models import CLS, PAD, SEP, bert_cls, gpt2, llama, tokens

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _train_grads(model, ids, labels, mask, mode, seed=0, steps=2, **kw):
    """Loss and gradients of ``steps`` optimizer steps (so a stale captured weight would show), per mode."""
    ckpt, graphs = {"full": (False, False), "eager": (True, False), "graphed": (True, True), "step": (False, True)}[mode]
    torch.manual_seed(seed)
    rmt = rmt_fast.wrap(model, checkpoint_segments=ckpt, cuda_graphs=graphs, **kw).cuda()
    rmt.memory.data.copy_(torch.linspace(-1, 1, rmt.memory.numel(), device="cuda").view_as(rmt.memory) * 0.02)
    rmt.train()
    opt = torch.optim.SGD(rmt.parameters(), lr=0.1)
    losses = []
    for i in range(steps):
        opt.zero_grad(set_to_none=True)
        torch.manual_seed(seed + i)
        out = rmt(ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        losses.append(out.loss.detach())
        grads = {n: p.grad.clone() for n, p in rmt.named_parameters() if p.grad is not None}
        opt.step()
    if mode == "step":  # full BPTT replayed as graphs: captured from the second call on (see run_call_graphs)
        assert rmt.runner.captures.of_kind("call"), "the call graphs were not used"
        if mask is None:
            expect = {"full-BPTT eager": 1, "full-BPTT captured": 1, "full-BPTT graphed": steps - 2}
            assert rmt.executor_counts() == {k: v for k, v in expect.items() if v}
    if mode == "graphed" and mask is None:
        assert rmt.executor_counts() == {"two-sweep graphed": steps}
    return torch.stack(losses), grads


@pytest.mark.parametrize("make,kw,dropout", [
    (gpt2, dict(num_mem_tokens=3, segment_size=16, keep_logits=False), False),
    (gpt2, dict(num_mem_tokens=3, segment_size=16, keep_logits=False, bptt_depth=2), False),
    (llama, dict(num_mem_tokens=4, segment_size=20, keep_logits=False), False),
    (bert_cls, dict(num_mem_tokens=3, segment_size=20, cls_token_id=CLS, sep_token_id=SEP, pad_token_id=PAD), False),
])
def test_graphed_training_equals_eager(make, kw, dropout):
    state = None
    results = {}
    for mode in ("full", "eager", "graphed"):
        model = make() if dropout else (make(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
                                        if make is bert_cls else make(**({} if make is llama else
                                                                         dict(resid_pdrop=0.0, embd_pdrop=0.0))))
        if state is None:
            state = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(state)
        model = model.cuda()
        ids = tokens(3, 90).cuda()
        torch.manual_seed(1)
        ids = tokens(3, 90).cuda()
        mask = torch.ones_like(ids)
        mask[1, :25] = 0
        labels = ids if make is not bert_cls else torch.tensor([0, 1, 2]).cuda()
        results[mode] = _train_grads(model, ids, labels, mask, mode, **kw)
    (l_full, g_full), (l_eager, g_eager), (l_graph, g_graph) = results["full"], results["eager"], results["graphed"]
    torch.testing.assert_close(l_eager, l_full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(l_graph, l_eager, atol=1e-5, rtol=1e-5)
    assert g_graph.keys() == g_eager.keys()
    for n in g_eager:
        torch.testing.assert_close(g_eager[n], g_full[n], atol=2e-5, rtol=1e-3, msg=lambda m: f"eager {n}: {m}")
        torch.testing.assert_close(g_graph[n], g_eager[n], atol=2e-5, rtol=1e-3, msg=lambda m: f"graphed {n}: {m}")


def test_graphed_training_with_dropout_is_deterministic():
    """Graphed dropout draws other numbers than eager dropout, but a replay of the same seed is exact."""
    ids = tokens(2, 70).cuda()
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = gpt2().cuda()
        runs.append(_train_grads(model, ids, ids, None, "graphed", num_mem_tokens=3, segment_size=16,
                                 keep_logits=False))
    torch.testing.assert_close(runs[0][0], runs[1][0], atol=0, rtol=0)
    for n in runs[0][1]:
        torch.testing.assert_close(runs[0][1][n], runs[1][1][n], atol=0, rtol=0)


def _no_dropout(make):
    if make is bert_cls:
        return make(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return make() if make is llama else make(resid_pdrop=0.0, embd_pdrop=0.0)


@pytest.mark.parametrize("make,kw", [
    (gpt2, dict(num_mem_tokens=3, segment_size=16, keep_logits=False)),
    (gpt2, dict(num_mem_tokens=3, segment_size=16, keep_logits=False, bptt_depth=2)),
    (llama, dict(num_mem_tokens=4, segment_size=20, keep_logits=False)),
    (bert_cls, dict(num_mem_tokens=3, segment_size=20, cls_token_id=CLS, sep_token_id=SEP, pad_token_id=PAD)),
])
def test_call_graphs_equal_full_bptt(make, kw):
    """Full-BPTT training (checkpoint_segments=False) replayed as forward/backward graphs of the whole call
    (rmt_fast.graphs.CallGraphs) gives eager full BPTT's losses and gradients over 3 optimizer steps. Every
    segment full (what CallGraphs captures): 5 segments of segment_size tokens per row."""
    base = _no_dropout(make)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    torch.manual_seed(1)
    ids = tokens(3, 5 * kw["segment_size"]).cuda()
    labels = ids if make is not bert_cls else torch.tensor([0, 1, 2]).cuda()
    results = {}
    for mode in ("full", "step"):
        model = _no_dropout(make)
        model.load_state_dict(state)
        results[mode] = _train_grads(model.cuda(), ids, labels, None, mode, steps=3, **kw)
    (l_full, g_full), (l_step, g_step) = results["full"], results["step"]
    torch.testing.assert_close(l_step, l_full, atol=1e-5, rtol=1e-5)
    assert g_step.keys() == g_full.keys()
    for n in g_full:
        torch.testing.assert_close(g_step[n], g_full[n], atol=2e-5, rtol=1e-3, msg=lambda m: f"step {n}: {m}")


def test_call_graphs_with_a_live_earlier_graph():
    """Each call's graph stays alive while the next one runs (the usual ``loss = model(...).loss`` loop): the
    capture must not reuse gradient nodes of the earlier eager graph (rmt_fast.graphs.ParameterAliases; before
    it, this capture was invalidated on an H200). Results equal eager full BPTT; the generator still works."""
    torch.manual_seed(1)
    ids = tokens(3, 80).cuda()
    base = gpt2(resid_pdrop=0.0, embd_pdrop=0.0)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    res = {}
    for graphs in (False, True):
        model = gpt2(resid_pdrop=0.0, embd_pdrop=0.0)
        model.load_state_dict(state)
        rmt = rmt_fast.wrap(model.cuda(), num_mem_tokens=3, segment_size=16, keep_logits=False,
                            cuda_graphs=graphs).cuda()
        rmt.memory.data.fill_(0.01)
        rmt.train()
        opt = torch.optim.SGD(rmt.parameters(), lr=0.1)
        losses = []
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            loss = rmt(ids, labels=ids).loss
            loss.backward()
            losses.append(loss.detach())
            opt.step()
        torch.randn(2, device="cuda")
        if graphs:
            assert rmt.runner.captures.of_kind("call")
        res[graphs] = (torch.stack(losses), model.get_input_embeddings().weight.detach().clone())
    for a, b in zip(res[False], res[True]):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_call_graphs_leave_ragged_calls_eager():
    """A call with a ragged segment (padding; a length not a multiple of segment_size) is not captured: no
    warning, eager results."""
    import warnings

    model = gpt2(resid_pdrop=0.0, embd_pdrop=0.0).cuda()
    rmt = rmt_fast.wrap(model, num_mem_tokens=3, segment_size=16, keep_logits=False).cuda()
    ids = tokens(2, 90).cuda()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            rmt(ids, labels=ids).loss.backward()
    assert not [w for w in caught if "capture" in str(w.message)]
    assert not rmt.runner.captures.of_kind("call")


def test_recover_from_failed_capture():
    """After a capture that raised, dropout (the CUDA generator) works again outside graphs."""
    from rmt_fast.graphs import recover_from_failed_capture

    x = torch.ones(4, device="cuda")
    g = torch.cuda.CUDAGraph()
    with pytest.raises(Exception):
        with torch.cuda.graph(g):
            torch.nn.functional.dropout(x, 0.5)
            x.sum().item()  # a host sync: the capture fails
    recover_from_failed_capture(x.device)
    torch.nn.functional.dropout(torch.ones(8, device="cuda"), 0.5)
    torch.randn(3, device="cuda")


def test_call_graphs_pending_call_and_autograd_grad():
    """Two calls before one backward (gradient accumulation in one graph): the second runs eagerly, the sum's
    gradients equal eager ones; torch.autograd.grad reaches the parameters; gradients accumulate over calls."""
    torch.manual_seed(0)
    model = gpt2(resid_pdrop=0.0, embd_pdrop=0.0).cuda()
    ids = tokens(2, 64).cuda()  # 4 full segments of 16
    ids2 = tokens(2, 64).cuda()
    res = {}
    for graphs in (False, True):
        rmt = rmt_fast.wrap(model, num_mem_tokens=3, segment_size=16, keep_logits=False, cuda_graphs=graphs).cuda()
        rmt.memory.data.fill_(0.01)
        rmt.train()
        for _ in range(2):  # the second call of this shape captures
            rmt(ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)
        pending = pytest.warns(RuntimeWarning, match="still waits for its backward") if graphs else nullcontext()
        with pending:  # the second call of the shape finds the capture holding the first call's activations
            loss = rmt(ids, labels=ids).loss + 0.5 * rmt(ids2, labels=ids2).loss
        loss.backward()
        w = model.get_input_embeddings().weight
        acc = w.grad.clone()
        rmt(ids, labels=ids).loss.backward()  # accumulates into .grad
        twice = w.grad.clone()
        (g,) = torch.autograd.grad(rmt(ids, labels=ids).loss, [w])
        res[graphs] = (loss.detach(), acc, twice, g)
        if graphs:
            assert rmt.runner.captures.of_kind("call")
    for a, b in zip(res[False], res[True]):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-3)


def _steps_with_a_logits_loss(rmt, ids, mask=None, steps=3) -> list:
    """``steps`` SGD steps in train mode, the middle one with a loss on the returned logits as well (their gradient
    enters the backward); per step the loss, the logits and every gradient."""
    rmt.train()
    opt = torch.optim.SGD(rmt.parameters(), lr=0.1)
    got = []
    for i in range(steps):
        opt.zero_grad(set_to_none=True)
        out = rmt(ids, attention_mask=mask, labels=ids)
        loss = out.loss + (out.logits.float().square().mean() if i == steps // 2 else 0)
        loss.backward()
        assert out.logits.shape[:2] == ids.shape
        got += [loss.detach(), out.logits.detach().clone(),
                *[p.grad.clone() for p in rmt.parameters() if p.grad is not None]]
        opt.step()
    return got


@pytest.mark.parametrize("make,kw", [
    (gpt2, dict(num_mem_tokens=3, segment_size=16)),
    (llama, dict(num_mem_tokens=4, segment_size=20, bptt_depth=2)),
])
def test_call_graphs_with_kept_logits_equal_full_bptt(make, kw):
    """The default decoder call (``keep_logits=True``: per-token logits returned) is replayed as call graphs when
    every segment is full and every input column is a content token: losses, logits and gradients equal eager
    full BPTT over 3 optimizer steps, the middle one with a loss taken from the returned logits as well (their
    gradient enters the backward graph)."""
    base = _no_dropout(make)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    torch.manual_seed(1)
    ids = tokens(3, 5 * kw["segment_size"]).cuda()
    res = {}
    for graphs in (False, True):
        model = _no_dropout(make)
        model.load_state_dict(state)
        rmt = rmt_fast.wrap(model.cuda(), cuda_graphs=graphs, **kw).cuda()
        rmt.memory.data.copy_(torch.linspace(-1, 1, rmt.memory.numel(), device="cuda").view_as(rmt.memory) * 0.02)
        got = _steps_with_a_logits_loss(rmt, ids)
        if graphs:
            assert rmt.runner.captures.of_kind("call"), "the call graphs were not used"
        res[graphs] = got
    assert len(res[True]) == len(res[False])
    for a, b in zip(res[False], res[True]):
        assert a.shape == b.shape
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-3)


@pytest.mark.parametrize("make,kw,padded", [
    (gpt2, dict(num_mem_tokens=3, segment_size=16), False),
    (gpt2, dict(num_mem_tokens=3, segment_size=16), True),
    (llama, dict(num_mem_tokens=4, segment_size=20, bptt_depth=2), True),
])
def test_two_sweep_with_kept_logits_graphed(make, kw, padded):
    """``checkpoint_segments=True`` with the default ``keep_logits=True`` replays the segment captures: losses,
    logits and gradients equal the eager two-sweep schedule and full BPTT over 3 optimizer steps (the middle one
    with a loss on the returned logits too), with full segments and with a left-padded row and a short last
    segment (ragged segments replay the layout capture)."""
    base = _no_dropout(make)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    torch.manual_seed(1)
    ids = tokens(3, 5 * kw["segment_size"] - (7 if padded else 0)).cuda()
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :11] = 0
    res = {}
    for ckpt, graphs in ((False, False), (True, False), (True, True)):
        model = _no_dropout(make)
        model.load_state_dict(state)
        rmt = rmt_fast.wrap(model.cuda(), checkpoint_segments=ckpt, cuda_graphs=graphs, **kw).cuda()
        rmt.memory.data.copy_(torch.linspace(-1, 1, rmt.memory.numel(), device="cuda").view_as(rmt.memory) * 0.02)
        got = _steps_with_a_logits_loss(rmt, ids, mask)
        if ckpt and graphs:
            assert rmt.executor_counts() == {"two-sweep graphed": 3}
        res[(ckpt, graphs)] = got
    for mode in ((True, False), (True, True)):
        assert len(res[mode]) == len(res[(False, False)])
        for a, b in zip(res[(False, False)], res[mode]):
            assert a.shape == b.shape
            torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-3, msg=lambda m: f"{mode}: {m}")


def test_call_graphs_with_kept_logits_leave_padded_columns_eager():
    """Kept logits with a padding column (every segment still full of content): the output's columns are not the
    segments side by side, so the call runs eagerly; logits keep the input's width."""
    model = gpt2(resid_pdrop=0.0, embd_pdrop=0.0).cuda()
    rmt = rmt_fast.wrap(model, num_mem_tokens=3, segment_size=16).cuda()
    ids = tokens(2, 81).cuda()
    mask = torch.ones_like(ids)
    mask[:, 0] = 0  # left padding: 80 content tokens, five full segments
    for _ in range(3):
        out = rmt(ids, attention_mask=mask, labels=ids)
        out.loss.backward()
    assert out.logits.shape[:2] == (2, 81)
    assert not rmt.runner.captures.of_kind("call")


def test_call_graphs_keep_a_capture_per_length():
    """A curriculum's mixed lengths (1, 2 or 3 full segments per call) under full BPTT: each length is captured
    once (on its second call) and replayed from then on, and the losses and gradients equal eager training's."""
    kw = dict(num_mem_tokens=3, segment_size=16, keep_logits=False)
    base = _no_dropout(gpt2)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    torch.manual_seed(1)
    lengths = [1, 2, 3, 2, 1, 3, 3, 1, 2, 1]
    batches = [tokens(2, n * kw["segment_size"]).cuda() for n in lengths]
    runs = {}
    for graphs in (False, True):
        model = _no_dropout(gpt2)
        model.load_state_dict(state)
        rmt = rmt_fast.wrap(model.cuda(), cuda_graphs=graphs, **kw).cuda().train()
        rmt.memory.data.copy_(torch.linspace(-1, 1, rmt.memory.numel(), device="cuda").view_as(rmt.memory) * 0.02)
        opt = torch.optim.SGD(rmt.parameters(), lr=0.1)
        losses, grads = [], []
        for ids in batches:
            opt.zero_grad(set_to_none=True)
            loss = rmt(ids, labels=ids).loss
            loss.backward()
            losses.append(loss.detach())
            grads.append(rmt.memory.grad.clone())
            opt.step()
        runs[graphs] = (torch.stack(losses), grads, rmt.executor_counts())
    torch.testing.assert_close(runs[True][0], runs[False][0], atol=1e-5, rtol=1e-5)
    for g_step, g_eager in zip(runs[True][1], runs[False][1]):
        torch.testing.assert_close(g_step, g_eager, atol=2e-5, rtol=1e-3)
    assert runs[True][2] == {"full-BPTT eager": 3, "full-BPTT captured": 3, "full-BPTT graphed": 4}


def test_deleting_the_model_frees_its_captures_without_gc():
    """After graphed training (full BPTT and two-sweep) and inference, ``del rmt`` frees the runner and every
    capture (and so the graphs' pools) by reference counting alone: the captures hold their runner weakly.
    drop_captures() frees the captures of a model still in use."""
    import gc
    import weakref

    def trained(**kw):
        rmt = rmt_fast.wrap(_no_dropout(gpt2).cuda(), num_mem_tokens=3, segment_size=16, keep_logits=False,
                            **kw).cuda()
        ids = tokens(2, 3 * 16).cuda()
        for _ in range(3):
            rmt(ids, labels=ids).loss.backward()
        with torch.no_grad():
            rmt(ids)
            rmt(ids)
        counts = rmt.executor_counts()
        assert counts.get("inference graphed") and (counts.get("full-BPTT graphed") or counts.get("two-sweep graphed"))
        return rmt

    gc.collect()
    gc.disable()
    try:
        for kw in ({}, dict(checkpoint_segments=True)):
            rmt = trained(**kw)
            r = rmt.runner
            held = [r, *r.captures.entries.values()]
            assert len(held) == 3
            refs = [weakref.ref(x) for x in held]
            del rmt, r, held
            assert all(ref() is None for ref in refs), kw
    finally:
        gc.enable()
    rmt = trained()
    rmt.drop_captures()
    assert len(rmt.runner.captures) == 0
    ids = tokens(2, 3 * 16).cuda()
    rmt(ids, labels=ids).loss.backward()  # captures again from the second call of a shape
    rmt(ids, labels=ids).loss.backward()
    assert rmt.executor_counts()["full-BPTT captured"] == 2


@pytest.mark.parametrize("ckpt", [False, True])
def test_train_and_eval_switched_between_calls(ckpt):
    """A model with dropout, trained with CUDA graphs in train() mode, then called in eval() mode (with gradients, and
    under no_grad) and in train() mode again: the eval-mode calls give eager eval-mode results (no dropout baked in
    from a train-mode capture), every time; a train-mode inference capture is not replayed in eval mode either."""
    torch.manual_seed(0)
    model = gpt2()  # dropout 0.1
    state = {k: v.clone() for k, v in model.state_dict().items()}
    kw = dict(num_mem_tokens=3, segment_size=16, keep_logits=False, checkpoint_segments=ckpt)
    rmt = rmt_fast.wrap(model.cuda(), **kw).cuda()
    ref_model = gpt2()
    ref_model.load_state_dict(state)
    ref = rmt_fast.wrap(ref_model.cuda(), cuda_graphs=False, **kw).cuda()
    ref.memory.data.copy_(rmt.memory.data)
    ids = tokens(2, 48).cuda()
    rmt.train()
    for _ in range(3):
        rmt(ids, labels=ids).loss.backward()
        with torch.no_grad():
            rmt(ids, labels=ids)  # a train-mode inference capture
    rmt.eval()
    ref.eval()
    with torch.no_grad():
        expect = ref(ids, labels=ids).loss
    for _ in range(3):
        loss = rmt(ids, labels=ids)
        loss.loss.backward()
        torch.testing.assert_close(loss.loss.detach(), expect, atol=1e-5, rtol=1e-5)
        with torch.no_grad():
            torch.testing.assert_close(rmt(ids, labels=ids).loss, expect, atol=1e-5, rtol=1e-5)
    rmt.train()
    rmt(ids, labels=ids).loss.backward()  # the train-mode captures again
    counts = rmt.executor_counts()
    assert counts.get("inference graphed", 0) >= 4, counts


@pytest.mark.parametrize("make,kw", [
    (gpt2, dict(num_mem_tokens=3, segment_size=16, num_cache_tokens=8)),
    (llama, dict(num_mem_tokens=4, segment_size=16, num_cache_tokens=16, bptt_depth=2)),
])
def test_short_term_cache_graphed_equals_eager(make, kw):
    """The short-term cache (num_cache_tokens) through every capture kind: full-BPTT call graphs and the two-sweep
    step graphs over 3 optimizer steps (losses and gradients against eager full BPTT), then inference under no_grad
    (logits, memory and the cache left behind, continued by a second call) against the eager model."""
    base = _no_dropout(make)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    torch.manual_seed(1)
    ids = tokens(2, 5 * kw["segment_size"]).cuda()
    results = {}
    for mode in ("full", "step", "graphed"):
        model = _no_dropout(make)
        model.load_state_dict(state)
        results[mode] = _train_grads(model.cuda(), ids, ids, None, mode, steps=3, **kw)
    l_full, g_full = results["full"]
    for mode in ("step", "graphed"):
        l_mode, g_mode = results[mode]
        torch.testing.assert_close(l_mode, l_full, atol=1e-5, rtol=1e-5)
        assert g_mode.keys() == g_full.keys()
        for n in g_full:
            torch.testing.assert_close(g_mode[n], g_full[n], atol=2e-5, rtol=1e-3, msg=lambda m: f"{mode} {n}: {m}")
    outs = {}
    for graphs in (False, "auto"):
        model = _no_dropout(make)
        model.load_state_dict(state)
        torch.manual_seed(2)  # the same initial memory for both wraps
        rmt = rmt_fast.wrap(model.cuda(), cuda_graphs=graphs, **kw).cuda().eval()
        mask = torch.ones_like(ids)
        mask[1, 3 * kw["segment_size"] + 5:] = 0  # a shorter second row: the ragged step capture too
        with torch.no_grad():
            first = rmt(ids, attention_mask=mask)
            second = rmt(ids[:, :40], memory=first.memory, short_term_cache=first.short_term_cache)
        outs[graphs] = (first, second, rmt.executor_counts())
    assert outs["auto"][2] == {"inference graphed": 2}
    for got, want in zip(outs["auto"][:2], outs[False][:2]):
        torch.testing.assert_close(got.logits, want.logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got.memory, want.memory, atol=1e-4, rtol=1e-4)
        for g, w in zip((*got.short_term_cache.keys, *got.short_term_cache.values),
                        (*want.short_term_cache.keys, *want.short_term_cache.values)):
            torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
        assert torch.equal(got.short_term_cache.lens, want.short_term_cache.lens)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_short_term_cache_on_fused_backends_equals_reference(backend):
    """A Llama RMT with a short-term cache on the fused attention kernels of ``backend``, trained eagerly with full
    BPTT for 2 steps over a ragged batch: losses and gradients equal the reference backend's."""
    from rmt_fast.ops import cuda as cuda_ext

    if backend == "cuda" and not cuda_ext.has_op("memory_attention"):
        pytest.skip("rmt_fast._C not built")
    kw = dict(num_mem_tokens=4, segment_size=16, num_cache_tokens=12)
    base = _no_dropout(llama)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    ids = tokens(2, 5 * kw["segment_size"] - 3).cuda()
    mask = torch.ones_like(ids)
    mask[1, 2 * kw["segment_size"] + 7:] = 0
    results = {}
    for name in ("reference", backend):
        model = _no_dropout(llama)
        model.load_state_dict(state)
        results[name] = _train_grads(model.cuda(), ids, ids, mask, "full", backend=name, **kw)
    (l_ref, g_ref), (l_got, g_got) = results["reference"], results[backend]
    torch.testing.assert_close(l_got, l_ref, atol=1e-5, rtol=1e-5)
    assert g_got.keys() == g_ref.keys()
    for n in g_ref:
        torch.testing.assert_close(g_got[n], g_ref[n], atol=2e-5, rtol=1e-3, msg=lambda m: f"{backend} {n}: {m}")
