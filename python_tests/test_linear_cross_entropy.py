"""Fused linear + cross-entropy (rmt_fast/ops/linear_cross_entropy) against the plain logits + cross-entropy."""
import pytest
import torch

import rmt_fast
from rmt_fast.ops.linear_cross_entropy import chunked, linear_cross_entropy
from models import gpt2, llama, lm_step, tokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [7 * 50, 1 << 24])  # several chunks (ragged last one), or one
def test_chunked_equals_reference(dtype, bias, chunk, monkeypatch):
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", chunk)
    n, d, v = 33, 16, 50
    h0 = torch.randn(n, d, dtype=dtype)
    w0 = torch.randn(v, d, dtype=dtype) * 0.3
    b0 = torch.randn(v, dtype=dtype) if bias else None
    t = torch.randint(0, v, (n,))
    t[::5] = -100
    res = []
    for backend in ("reference", "chunked"):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        b = b0.clone().requires_grad_() if bias else None
        loss = linear_cross_entropy(h, w, b, t, backend=backend)
        (loss * 0.37).backward()
        res.append((loss.detach(), h.grad, w.grad, None if b is None else b.grad))
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    for a, b in zip(*res):
        if a is not None:
            assert a.dtype == b.dtype
            torch.testing.assert_close(a, b, **tol)


def test_no_grad_and_bad_backend():
    h, w, t = torch.randn(5, 4), torch.randn(7, 4), torch.randint(0, 7, (5,))
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, None, t, backend="chunked"),
                                   linear_cross_entropy(h, w, None, t, backend="reference"))
    with pytest.raises(ValueError, match="backend"):
        linear_cross_entropy(h, w, None, t, backend="nope")


@pytest.mark.parametrize("make", [gpt2, llama])
@pytest.mark.parametrize("ckpt", [False, True])
def test_model_loss_fused_equals_plain(make, ckpt):
    """keep_logits=False takes the fused loss; keep_logits=True takes logits then cross-entropy."""
    model = make(tie_word_embeddings=False)
    ids = tokens(2, 37)
    res = []
    mem0 = None
    for keep in (True, False):
        rmt = rmt_fast.wrap(model, num_mem_tokens=2, segment_size=10, keep_logits=keep, checkpoint_segments=ckpt)
        if mem0 is None:
            mem0 = rmt.memory.detach().clone()
        rmt.memory.data.copy_(mem0)
        model.zero_grad(set_to_none=True)
        out = rmt(ids, labels=ids)
        out.loss.backward()
        res.append((out.loss.detach(), rmt.memory.grad, model.get_output_embeddings().weight.grad,
                    model.get_input_embeddings().weight.grad))
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_bytes", [4 * 7 * 50, 1 << 28])  # several chunks, or one
@pytest.mark.parametrize("pad", [False, True])  # the odd vocabulary's matmuls on a zero-padded weight (aligned.py)
def test_triton_equals_reference(dtype, bias, chunk_bytes, pad, monkeypatch):
    """The Triton row kernel (interpreted on the CPU) against the plain path, forward and backward."""
    from rmt_fast.ops.linear_cross_entropy import aligned
    from rmt_fast.ops.linear_cross_entropy import triton as lce_triton

    monkeypatch.setattr(aligned, "PAD_ON_CPU", pad)
    monkeypatch.setattr(lce_triton, "CHUNK_BYTES", chunk_bytes * torch.finfo(dtype).bits // 32)
    monkeypatch.setattr(lce_triton, "BLOCK_V", 16)  # several vocabulary blocks per row (ragged last one)
    n, d, v = 21, 8, 50
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the Triton interpreter
    h0 = torch.randn(n, d).to(dev, dtype)
    w0 = (torch.randn(v, d) * 0.3).to(dev, dtype)
    b0 = torch.randn(v).to(dev, dtype) if bias else None
    t = torch.randint(0, v, (n,), device=dev)
    t[::4] = -100
    res = []
    for backend in ("reference", "triton"):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        b = b0.clone().requires_grad_() if bias else None
        loss = linear_cross_entropy(h, w, b, t, backend=backend)
        (loss * 0.37).backward()
        res.append((loss.detach(), h.grad, w.grad, None if b is None else b.grad))
        with torch.no_grad():
            torch.testing.assert_close(linear_cross_entropy(h, w, b, t, backend=backend), loss.detach())
    tol = dict(atol=1e-2, rtol=1e-2) if dtype == torch.float16 else dict(atol=1e-5, rtol=1e-5)
    if dev == "cuda" and dtype == torch.float32:
        tol = dict(atol=1e-3, rtol=1e-3)  # TF32 matmuls may differ between the two paths
    for a, b in zip(*res):
        if a is not None:
            torch.testing.assert_close(a, b, **tol)


def test_cross_entropy_sum_matches_reference():
    from rmt_fast.ops.linear_cross_entropy import cross_entropy_sum

    logits = torch.randn(9, 30)
    t = torch.randint(0, 30, (9,))
    t[2] = -100
    torch.testing.assert_close(cross_entropy_sum(logits, t),
                               torch.nn.functional.cross_entropy(logits, t, reduction="sum"))


@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_under_autocast_fp32_weights(backend):
    if torch.cuda.is_available() and backend == "triton":
        pytest.skip("CPU autocast check; on a GPU test_triton_equals_reference and test_gpu_training cover it")
    """bf16 autocast over fp32 hidden and weight (how training runs): same loss and gradients as the plain path."""
    n, d, v = 12, 8, 40
    h0, w0 = torch.randn(n, d), torch.randn(v, d) * 0.3
    t = torch.randint(0, v, (n,))
    res = []
    for b in ("reference", backend):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = linear_cross_entropy(h, w, None, t, backend=b)
        loss.backward()
        assert h.grad.dtype == w.grad.dtype == torch.float32
        res.append((loss.detach(), h.grad, w.grad))
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("v", [50, 64])
def test_aligned_lm_logits_equal_linear(bias, v, monkeypatch):
    """The padded LM head gives F.linear's logits (a row-strided view when padded) and the same gradients."""
    from rmt_fast.ops.linear_cross_entropy import aligned

    monkeypatch.setattr(aligned, "PAD_ON_CPU", True)
    h0, w0 = torch.randn(3, 5, 8, dtype=torch.float64), torch.randn(v, 8, dtype=torch.float64)
    b0 = torch.randn(v, dtype=torch.float64) if bias else None
    res = []
    for fn in (torch.nn.functional.linear, aligned.lm_logits):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        b = b0.clone().requires_grad_() if bias else None
        out = fn(h, w, b)
        assert out.shape == (3, 5, v)
        (out * torch.linspace(-1, 1, v, dtype=torch.float64)).sum().backward()
        res.append((out.detach(), h.grad, w.grad, None if b is None else b.grad))
    padded = aligned.needs_padding(w0)
    assert padded == (v % 8 != 0)
    if padded:
        assert res[1][0].stride(-2) == v + (-v) % aligned.ALIGN  # the first v columns of [.., Vp]
    for a, b in zip(*res):
        if a is not None:
            torch.testing.assert_close(a, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert aligned.lm_logits(h0.float(), w0.float()).dtype == torch.bfloat16


def test_model_logits_with_padded_head(monkeypatch):
    """A wrapped GPT-2 with an odd vocabulary: logits, loss and gradients equal with and without the padded head."""
    from rmt_fast.ops.linear_cross_entropy import aligned

    from models import VOCAB

    assert VOCAB % 8  # the test vocabulary is odd: the padded path runs where PAD_ON_CPU is set
    model = gpt2()
    ids = tokens(2, 23)
    rmt = rmt_fast.wrap(model, num_mem_tokens=2, segment_size=8)
    res = []
    for pad in (False, True):
        monkeypatch.setattr(aligned, "PAD_ON_CPU", pad)
        model.zero_grad(set_to_none=True)
        rmt.memory.grad = None
        res.append(lm_step(rmt, ids, model.get_output_embeddings().weight))
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
