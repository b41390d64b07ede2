"""GPU-only checks of the whole wrapped model: fast backends and CUDA graphs change speed, never results."""
import pytest
import torch

import rmt_fast
import rmt_fast.ops.cuda
from models import CLS, PAD, SEP, bert_cls, gpt2, llama, tokens

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _pair(make, **kw):
    model = make().cuda()
    a = rmt_fast.wrap(model, backend="reference", **kw).cuda()
    return model, a


@pytest.mark.parametrize("make,kw", [
    (gpt2, dict(num_mem_tokens=3, segment_size=16)),
    (gpt2, dict(num_mem_tokens=3, segment_size=16, memory_bidirectional=True)),
    (llama, dict(num_mem_tokens=4, segment_size=20)),
    (bert_cls, dict(num_mem_tokens=3, cls_token_id=CLS, sep_token_id=SEP, pad_token_id=PAD)),
])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_backend_matches_reference_fwd_bwd(make, kw, backend):
    if backend == "cuda" and not rmt_fast.ops.cuda.available():
        pytest.skip("rmt_fast._C not built")
    model, ref = _pair(make, **kw)
    fast = rmt_fast.wrap(model, backend=backend, **kw).cuda()
    fast.memory = ref.memory
    ids = tokens(3, 70).cuda()
    mask = torch.ones_like(ids)
    mask[1, 40:] = 0
    labels = ids if make is not bert_cls else torch.tensor([0, 1, 2]).cuda()
    outs = []
    for r in (ref, fast):
        model.zero_grad(set_to_none=True)
        ref.memory.grad = None
        out = r(ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        outs.append((out.logits.detach(), out.memory.detach(), ref.memory.grad.clone(),
                     next(model.parameters()).grad.clone()))
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, atol=2e-4, rtol=2e-3)


@pytest.mark.parametrize("make,kw", [
    (gpt2, dict(num_mem_tokens=3, segment_size=16)),
    (llama, dict(num_mem_tokens=2, segment_size=12)),
    (bert_cls, dict(num_mem_tokens=3, cls_token_id=CLS, sep_token_id=SEP, pad_token_id=PAD)),
])
def test_cuda_graphs_equal_eager(make, kw):
    model = make().cuda()
    eager = rmt_fast.wrap(model, **kw).cuda()
    graphed = rmt_fast.wrap(model, cuda_graphs=True, **kw).cuda()
    graphed.memory = eager.memory
    labels_ok = make is not bert_cls
    with torch.no_grad():
        for t in (50, 90, 23):  # different lengths reuse or grow the captured buffers
            ids = tokens(2, t).cuda()
            mask = torch.ones_like(ids)
            mask[0, t // 2:] = 0
            kwargs = dict(labels=ids) if labels_ok else {}
            a = eager(ids, attention_mask=mask, **kwargs)
            b = graphed(ids, attention_mask=mask, **kwargs)
            torch.testing.assert_close(b.memory, a.memory, atol=1e-4, rtol=1e-3)
            torch.testing.assert_close(b.logits, a.logits, atol=1e-4, rtol=1e-3)
            if labels_ok:
                torch.testing.assert_close(b.loss, a.loss, atol=1e-4, rtol=1e-3)
    assert graphed.runner.captures.of_kind("inference"), "no graph was captured"


def test_bf16_fast_path_close_to_reference():
    model = gpt2().cuda().to(torch.bfloat16)
    ref = rmt_fast.wrap(model, num_mem_tokens=4, segment_size=24, backend="reference")
    fast = rmt_fast.wrap(model, num_mem_tokens=4, segment_size=24, cuda_graphs=True)
    fast.memory = ref.memory
    ids = tokens(2, 100).cuda()
    with torch.no_grad():
        a, b = ref(ids, labels=ids), fast(ids, labels=ids)
    assert abs(float(a.loss) - float(b.loss)) < 2e-2


def test_generate_on_gpu_matches_slow_loop():
    rmt = rmt_fast.wrap(llama().cuda(), num_mem_tokens=2, segment_size=6).cuda()
    prompt = tokens(2, 9).cuda()
    fast = rmt.generate(prompt, max_new_tokens=10, eos_token_id=[])
    seq = prompt
    with torch.no_grad():
        for _ in range(10):
            seq = torch.cat([seq, rmt(seq).logits[:, -1].argmax(-1)[:, None]], 1)
    assert torch.equal(fast, seq)
