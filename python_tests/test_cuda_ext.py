"""The CUDA extension (rmt_fast._C) against the reference ops.

The GPU tests need the built extension and a CUDA device; elsewhere they skip with the reason. The CMake
compile check of csrc/ is not run here (too slow): .ci/compile_cuda.sh does it.
"""
from __future__ import annotations

import pytest
import torch

from rmt_fast.ops import cuda, memory_attention
from rmt_fast.ops.reference import SegmentLayout, memory_attention_ref, segment_handoff_ref

needs_ext = pytest.mark.skipif(
    not cuda.available(),
    reason="rmt_fast._C CUDA extension not built or no CUDA device (build with `pip install --no-build-isolation .` "
           "on a machine with nvcc and a CUDA torch)",
)


def test_cuda_module_imports_without_extension():
    assert isinstance(cuda.available(), bool)
    if not torch.cuda.is_available():
        assert not cuda.available()
        assert not cuda.has_op("memory_attention")
        assert not cuda.has_op("segment_handoff")
        layout = SegmentLayout(1, 1, torch.tensor([2]), causal=True)
        q = torch.zeros(1, 1, 4, 8)
        with pytest.raises(RuntimeError, match="not available"):
            cuda.memory_attention_cuda(q, q, q, layout)
    assert cuda.has_op("memory_attention") == cuda.available()


def _random_layout(gen, batch, n, num_read, num_write, causal, bidirectional, full_row=True):
    max_len = n - num_read - num_write
    seq_lens = torch.randint(0, max_len + 1, (batch,), generator=gen)
    if full_row:
        seq_lens[0] = max_len  # one row with no padding at all
    if batch > 1:
        seq_lens[-1] = 0  # one row with memory slots only
    return SegmentLayout(num_read, num_write, seq_lens.cuda(), causal=causal, memory_bidirectional=bidirectional)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs error over max(|b|, 1): gradients that cancel to ~0 (one-key rows) compare absolutely."""
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item()


def _attention_case(dtype, batch, hq, hkv, n, d, num_read, num_write, causal, bidirectional, seed):
    gen = torch.Generator().manual_seed(seed)
    layout = _random_layout(gen, batch, n, num_read, num_write, causal, bidirectional)
    q = torch.randn(batch, hq, n, d, generator=gen).to("cuda", dtype)
    k = torch.randn(batch, hkv, n, d, generator=gen).to("cuda", dtype)
    v = torch.randn(batch, hkv, n, d, generator=gen).to("cuda", dtype)
    dout = torch.randn(batch, hq, n, d, generator=gen).to("cuda", dtype)
    return layout, q, k, v, dout


def _check_attention(layout, q, k, v, dout, scale=None, fwd_tol=None, bwd_tol=None):
    low = q.dtype != torch.float32
    fwd_tol = fwd_tol or (4e-3 if low else 2e-5)
    bwd_tol = bwd_tol or (2e-2 if low else 1e-4)
    q1, k1, v1 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = cuda.memory_attention_cuda(q1, k1, v1, layout, scale)
    out.backward(dout)
    q2, k2, v2 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = memory_attention_ref(q2, k2, v2, layout, scale)
    ref.backward(dout.float())
    assert out.dtype == q.dtype and out.shape == q.shape
    assert _rel_err(out, ref) < fwd_tol, f"forward rel err {_rel_err(out, ref):.3g}"
    for name, got, want in (("dq", q1.grad, q2.grad), ("dk", k1.grad, k2.grad), ("dv", v1.grad, v2.grad)):
        assert got.dtype == q.dtype and got.shape == want.shape
        assert torch.isfinite(got).all(), name
        assert _rel_err(got, want) < bwd_tol, f"{name} rel err {_rel_err(got, want):.3g}"
    # padding: zero outputs, zero gradients into padded positions
    valid = layout.valid_lens.tolist()
    for b, vlen in enumerate(valid):
        assert (out[b, :, vlen:] == 0).all()
        assert (k1.grad[b, :, vlen:] == 0).all() and (v1.grad[b, :, vlen:] == 0).all()
        assert (q1.grad[b, :, vlen:] == 0).all()


MASKS = [(False, False), (True, False), (True, True)]


@needs_ext
@pytest.mark.parametrize("causal,bidirectional", MASKS, ids=["encoder", "causal", "bidirectional"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("d", [32, 64, 128])
def test_attention_matches_reference(causal, bidirectional, dtype, d):
    case = _attention_case(dtype, batch=3, hq=4, hkv=4, n=77, d=d, num_read=5, num_write=5, causal=causal,
                           bidirectional=bidirectional, seed=d)
    _check_attention(*case)


@needs_ext
@pytest.mark.parametrize("causal,bidirectional", MASKS, ids=["encoder", "causal", "bidirectional"])
@pytest.mark.parametrize("hq,hkv", [(4, 1), (6, 2), (8, 4)])
def test_attention_gqa(causal, bidirectional, hq, hkv):
    case = _attention_case(torch.float32, batch=2, hq=hq, hkv=hkv, n=53, d=64, num_read=3, num_write=3,
                           causal=causal, bidirectional=bidirectional, seed=hq * 10 + hkv)
    _check_attention(*case)


@needs_ext
@pytest.mark.parametrize("n,d,num_read,num_write", [
    (1, 16, 0, 0), (17, 8, 0, 0), (33, 80, 4, 0), (130, 96, 0, 7), (131, 128, 16, 16), (300, 40, 32, 32),
    (45, 100, 1, 1),
])
@pytest.mark.parametrize("causal,bidirectional", MASKS, ids=["encoder", "causal", "bidirectional"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_attention_odd_shapes(n, d, num_read, num_write, causal, bidirectional, dtype):
    case = _attention_case(dtype, batch=3, hq=2, hkv=1, n=n, d=d, num_read=num_read, num_write=num_write,
                           causal=causal, bidirectional=bidirectional, seed=n + d)
    _check_attention(*case)


@needs_ext
def test_attention_scale_strides_and_dispatch():
    gen = torch.Generator().manual_seed(7)
    b, n, h, d = 2, 40, 3, 64
    layout = _random_layout(gen, b, n, 4, 4, causal=True, bidirectional=True)
    # [B, N, H, D] storage viewed as [B, H, N, D], as HF attention modules hand it over
    q, k, v, dout = (torch.randn(b, n, h, d, generator=gen).cuda().transpose(1, 2) for _ in range(4))
    assert not q.is_contiguous()
    _check_attention(layout, q, k, v, dout, scale=0.3)
    out = memory_attention(q, k, v, layout, backend="cuda")
    torch.testing.assert_close(out, memory_attention_ref(q, k, v, layout), atol=2e-5, rtol=2e-5)


@needs_ext
def test_attention_bf16_is_computed_in_fp32():
    case = _attention_case(torch.bfloat16, batch=2, hq=2, hkv=2, n=29, d=32, num_read=2, num_write=2, causal=True,
                           bidirectional=False, seed=3)
    _check_attention(*case, fwd_tol=2e-2, bwd_tol=3e-2)


@needs_ext
def test_attention_rejects_bad_inputs():
    layout = SegmentLayout(1, 1, torch.tensor([2]).cuda(), causal=True)
    q = torch.zeros(1, 2, 8, 160, device="cuda")
    with pytest.raises(ValueError, match="head dims"):
        cuda.memory_attention_cuda(q, q, q, layout)
    q = torch.zeros(1, 2, 8, 16, device="cuda", dtype=torch.float64)
    with pytest.raises(ValueError, match="float32"):
        cuda.memory_attention_cuda(q, q, q, layout)
    q = torch.zeros(1, 3, 8, 16, device="cuda")
    kv = torch.zeros(1, 2, 8, 16, device="cuda")
    with pytest.raises(ValueError, match="multiple"):
        cuda.memory_attention_cuda(q, kv, kv, layout)


@needs_ext
def test_attention_long_causal_row_skips_no_needed_tile():
    # 16-query tiles and 32-key tiles straddle the read block, the token block and the write block
    case = _attention_case(torch.float32, batch=2, hq=2, hkv=2, n=611, d=64, num_read=37, num_write=45,
                           causal=True, bidirectional=True, seed=11)
    _check_attention(*case)


def _handoff_case(gen, b, n_prev, n, m, d, dtypes, with_hidden, with_write, read_offset):
    hidden_dtype, memory_dtype, embeds_dtype = dtypes
    hidden = torch.randn(b, n_prev, d, generator=gen).to("cuda", hidden_dtype) if with_hidden else None
    memory = torch.randn(b, m, d, generator=gen).to("cuda", memory_dtype)
    embeds = torch.randn(b, n, d, generator=gen).to("cuda", embeds_dtype)
    gather = torch.randint(0, n_prev - m + 1, (b,), generator=gen)
    gather[0] = -1  # a row with no segment keeps its memory
    write = torch.randint(read_offset + m, n - m + 1, (b,), generator=gen) if with_write else None
    return (hidden, memory, gather.cuda() if with_hidden else None, embeds, read_offset,
            write.cuda() if with_write else None)


def _leaf(t):
    return None if t is None else t.detach().clone().requires_grad_()


@needs_ext
@pytest.mark.parametrize("dtypes", [
    (torch.float32, torch.float32, torch.float32),
    (torch.float16, torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32, torch.bfloat16),
    (torch.float32, torch.float16, torch.bfloat16),
], ids=["fp32", "fp16", "bf16", "bf16-fp32mem", "mixed"])
@pytest.mark.parametrize("with_hidden", [True, False], ids=["hidden", "first"])
@pytest.mark.parametrize("with_write,read_offset", [(True, 0), (False, 1), (True, 1)],
                         ids=["decoder", "encoder", "both"])
def test_handoff_matches_reference(dtypes, with_hidden, with_write, read_offset):
    gen = torch.Generator().manual_seed(5)
    args = _handoff_case(gen, b=4, n_prev=50, n=40, m=6, d=24, dtypes=dtypes, with_hidden=with_hidden,
                         with_write=with_write, read_offset=read_offset)
    hidden, memory, gather, embeds, ro, write = args
    h1, m1, e1 = _leaf(hidden), _leaf(memory), _leaf(embeds)
    new_mem, out = cuda.segment_handoff_cuda(h1, m1, gather, e1, ro, write)
    h2, m2, e2 = _leaf(hidden), _leaf(memory), _leaf(embeds)
    ref_mem, ref_out = segment_handoff_ref(h2, m2, gather, e2, ro, write)
    assert new_mem.dtype == ref_mem.dtype and out.dtype == ref_out.dtype
    torch.testing.assert_close(new_mem, ref_mem, atol=0, rtol=0)
    torch.testing.assert_close(out, ref_out, atol=0, rtol=0)

    g_mem = torch.randn(new_mem.shape, generator=gen).to("cuda", new_mem.dtype)
    g_out = torch.randn(out.shape, generator=gen).to("cuda", out.dtype)
    torch.autograd.backward((new_mem, out), (g_mem, g_out))
    torch.autograd.backward((ref_mem, ref_out), (g_mem, g_out))
    tol = dict(atol=1e-6, rtol=1e-6) if all(t == torch.float32 for t in dtypes) else dict(atol=2e-2, rtol=2e-2)
    for name, got, want in (("hidden", h1, h2), ("memory", m1, m2), ("token_embeds", e1, e2)):
        if got is None:
            continue
        assert got.grad is not None and got.grad.dtype == want.grad.dtype, name
        torch.testing.assert_close(got.grad, want.grad, **tol, msg=lambda s: f"{name}: {s}")


@needs_ext
def test_handoff_partial_grads_and_dispatch():
    gen = torch.Generator().manual_seed(9)
    hidden, memory, gather, embeds, ro, write = _handoff_case(
        gen, b=3, n_prev=30, n=30, m=4, d=8, dtypes=(torch.float32,) * 3, with_hidden=True, with_write=True,
        read_offset=0)
    h1 = _leaf(hidden)
    new_mem, out = cuda.segment_handoff_cuda(h1, memory, gather, embeds, ro, write)
    out.sum().backward()  # only embeds used; memory and token_embeds need no grad
    h2 = _leaf(hidden)
    _, ref_out = segment_handoff_ref(h2, memory, gather, embeds, ro, write)
    ref_out.sum().backward()
    torch.testing.assert_close(h1.grad, h2.grad)
    from rmt_fast.ops import segment_handoff

    got = segment_handoff(hidden, memory, gather, embeds, ro, write, backend="cuda")
    want = segment_handoff_ref(hidden, memory, gather, embeds, ro, write)
    torch.testing.assert_close(got, want)


@needs_ext
def test_handoff_no_slots_and_bad_offset():
    memory = torch.zeros(2, 0, 8, device="cuda")
    embeds = torch.randn(2, 10, 8, device="cuda")
    new_mem, out = cuda.segment_handoff_cuda(None, memory, None, embeds, 0, None)
    assert new_mem is memory and out is embeds
    with pytest.raises(ValueError, match="read_offset"):
        cuda.segment_handoff_cuda(None, torch.zeros(2, 4, 8, device="cuda"), None, embeds, 7, None)
