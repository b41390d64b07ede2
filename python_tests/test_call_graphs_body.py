"""The segment loop that a full-BPTT call capture records (rmt_fast.graphs.CallGraphs._forward_body), run eagerly on
the CPU in place of the capture: the call shape logic of run_call_graphs, the static buffers it loads and the loop
body give the eager path's outputs and gradients. (python_tests/test_gpu_training.py replays the real captures.)"""
import pytest
import torch

import rmt_fast
import rmt_fast.graphs as graphs_mod
from models import CLS, PAD, SEP, bert_cls, gpt2, tokens
from rmt_fast.graphs import ParameterAliases, weak_runner
from rmt_fast.schemes import P_GATHER

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU stand-in (tensors that claim to be on "
                                "CUDA reach CUDA kernels on a GPU host); test_gpu_training.py runs the real captures")


class EagerCallGraphs(graphs_mod.CallGraphs):
    """CallGraphs' buffers and body without the CUDA graphs: :meth:`run` records the body with autograd, as the
    forward graph's capture does."""

    made = []

    def __init__(self, runner, b, g_total, memory, want_output, targets, content_dtype, autocast):
        self.runner, self.want_output, self.autocast = weak_runner(runner), want_output, autocast
        self.width, self.g_total = runner.config.segment_size, g_total
        capacity = g_total * self.width
        self.content = torch.zeros(b, capacity, dtype=content_dtype)
        self.targets = None if targets is None else torch.full((b, capacity), -100, dtype=torch.long)
        self.params = torch.zeros(g_total, 5, b, dtype=torch.long)
        self.params[:, P_GATHER] = -1
        self.mem_in = memory.detach().clone().requires_grad_(True)
        self.params_of = ParameterAliases(runner.adapter.model)
        self.params_of.make()
        self.parameters = self.params_of.parameters
        self.owner, self.pool_bytes = None, 0
        self.cache_in = None
        if runner.config.num_cache_tokens:  # the warm-up makes the short-term cache's static buffers
            self.params_of.run(self._forward_body)
        EagerCallGraphs.made.append(self)


class EagerApply:
    @staticmethod
    def apply(graphs, memory, *parameters):
        graphs.outs = graphs.params_of.run(graphs._forward_body)
        return tuple(graphs.outs)


def _gpt2():
    return gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def _bert():
    return bert_cls(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


@pytest.mark.parametrize("make,kw,labels", [
    (_gpt2, dict(num_mem_tokens=3, segment_size=8), "lm"),
    (_gpt2, dict(num_mem_tokens=3, segment_size=8, keep_logits=False, bptt_depth=2), "lm"),
    (_bert, dict(num_mem_tokens=3, segment_size=10, cls_token_id=CLS, sep_token_id=SEP, pad_token_id=PAD), "cls"),
    (_gpt2, dict(num_mem_tokens=3, segment_size=8, num_cache_tokens=3), "lm"),
    (_gpt2, dict(num_mem_tokens=3, segment_size=8, num_cache_tokens=5, bptt_depth=1), "lm"),
])
def test_call_capture_body_equals_eager(monkeypatch, make, kw, labels):
    torch.manual_seed(0)
    base = make()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    ids = tokens(3, 4 * kw["segment_size"])
    y = ids if labels == "lm" else torch.tensor([0, 3, 5])
    runs = {}
    for graphs in (False, True):
        model = make()
        model.load_state_dict(state)
        rmt = rmt_fast.wrap(model, cuda_graphs=graphs, **kw).train()
        rmt.memory.data.copy_(torch.linspace(-1, 1, rmt.memory.numel()).view_as(rmt.memory) * 0.02)
        if graphs:
            EagerCallGraphs.made = []
            monkeypatch.setattr(graphs_mod, "CallGraphs", EagerCallGraphs)
            monkeypatch.setattr(graphs_mod, "_GraphedCall", EagerApply)
            monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
            monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
            rmt.runner.captures.budget_bytes = 1 << 40
            rmt(ids, labels=y)  # the shape's first call runs eagerly
        out = rmt(ids, labels=y)
        cont = None
        if kw.get("num_cache_tokens"):  # a call continuing the memory and short-term cache of the last one
            cont = rmt(ids, labels=y, memory=out.memory.detach(), short_term_cache=out.short_term_cache.detach())
        if graphs:
            monkeypatch.undo()
            want = {"full-BPTT eager": 1, "full-BPTT captured": 1}
            if cont is not None:
                want["full-BPTT graphed"] = 1
            assert rmt.executor_counts() == want
            (cg,) = EagerCallGraphs.made
            leaves = [cg.mem_in, *cg.params_of.aliases]
            names = ["memory", *cg.params_of.names]
        else:
            leaves = [rmt.memory, *[p for p in rmt.model.parameters() if p.requires_grad]]
            names = ["memory", *[n for n, p in rmt.model.named_parameters() if p.requires_grad]]
        grads = torch.autograd.grad(out.loss, leaves, allow_unused=True)
        grads = {n: None if g is None else (g.sum(0) if n == "memory" and g.dim() == 3 else g)
                 for n, g in zip(names, grads)}
        runs[graphs] = (out, grads, cont)
    (eager, g_eager, cont_eager), (body, g_body, cont_body) = runs[False], runs[True]
    if cont_eager is not None:
        for got, want in ((body, eager), (cont_body, cont_eager)):
            torch.testing.assert_close(got.loss, want.loss, atol=1e-6, rtol=1e-5)
            for g, w in zip((*got.short_term_cache.keys, *got.short_term_cache.values),
                            (*want.short_term_cache.keys, *want.short_term_cache.values)):
                torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)
            assert torch.equal(got.short_term_cache.lens, want.short_term_cache.lens)
    torch.testing.assert_close(body.loss, eager.loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(body.memory, eager.memory, atol=1e-6, rtol=1e-5)
    if eager.logits is not None:
        torch.testing.assert_close(body.logits, eager.logits, atol=1e-6, rtol=1e-5)
    assert g_body.keys() == g_eager.keys()
    for n in g_eager:
        if g_eager[n] is None:
            assert g_body[n] is None or not g_body[n].any(), n
        else:
            torch.testing.assert_close(g_body[n], g_eager[n], atol=1e-6, rtol=1e-4, msg=lambda m: f"{n}: {m}")
