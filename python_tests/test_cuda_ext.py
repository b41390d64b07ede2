"""The CUDA extension (rmt_fast._C) beyond the conformance suites (python_tests/ops/): its loader without a build,
the attention kernel's tile boundaries at long and odd shapes, the handoff kernels' vector paths at large widths and
their fallbacks for widths and pointers that do not allow 16-byte accesses.

The GPU tests need the built extension and a CUDA device; elsewhere they skip with the reason. The compile check of
csrc/ is not run here (too slow): .ci/compile_cuda.sh does it.
"""
from __future__ import annotations

import pytest
import torch

from rmt_fast.ops import SegmentLayout
from rmt_fast.ops.memory_attention import memory_attention
from rmt_fast.ops.segment_handoff import segment_handoff
from rmt_fast.ops import cuda
from rmt_fast.ops.memory_attention.reference import memory_attention_ref
from rmt_fast.ops.segment_handoff.reference import segment_handoff_ref

needs_ext = pytest.mark.skipif(
    not cuda.available(),
    reason="rmt_fast._C CUDA extension not built or no CUDA device (build with `pip install --no-build-isolation .` "
           "on a machine with nvcc and a CUDA torch)",
)


def test_loader_without_extension():
    assert isinstance(cuda.available(), bool)
    assert cuda.has_op("memory_attention") == cuda.available()
    assert cuda.has_op("segment_handoff") == cuda.available()
    if not cuda.available():
        with pytest.raises(RuntimeError, match="not available"):
            cuda.extension("segment_handoff")
    if not torch.cuda.is_available():
        layout = SegmentLayout(1, 1, torch.tensor([2]), causal=True, memory_bidirectional=True)
        q = torch.zeros(1, 1, 4, 8)
        with pytest.raises(ValueError, match="cuda"):
            memory_attention(q, q, q, layout, backend="cuda")


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs error over max(|b|, 1): gradients that cancel to ~0 (one-key rows) compare absolutely."""
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item()


@needs_ext
@pytest.mark.parametrize("n,d,num_read,num_write", [
    (1, 16, 0, 0), (17, 8, 0, 0), (130, 96, 0, 7), (300, 40, 32, 32), (611, 64, 37, 45),
])
@pytest.mark.parametrize("causal,bidirectional", [(False, False), (True, False), (True, True)],
                         ids=["encoder", "causal", "bidirectional"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_attention_tile_boundaries(n, d, num_read, num_write, causal, bidirectional, dtype):
    """16-query and 32-key tiles straddling the read block, the tokens and the write block of long rows."""
    gen = torch.Generator().manual_seed(n + d)
    lens = torch.randint(0, n - num_read - num_write + 1, (3,), generator=gen)
    lens[0], lens[-1] = n - num_read - num_write, 0
    layout = SegmentLayout(num_read, num_write, lens.cuda(), causal, bidirectional)
    q = torch.randn(3, 2, n, d, generator=gen).to("cuda", dtype).requires_grad_()
    k, v = (torch.randn(3, 1, n, d, generator=gen).to("cuda", dtype).requires_grad_() for _ in range(2))
    valid = (torch.arange(n, device="cuda")[None] < layout.valid_lens[:, None])[:, None, :, None]
    dout = torch.randn(q.shape, generator=gen).to("cuda", dtype) * valid
    out = memory_attention(q, k, v, layout, backend="cuda")
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref = memory_attention_ref(*(t.float() for t in (q, k, v)), layout)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout.float())
    low = dtype != torch.float32
    assert _rel_err(out * valid, ref * valid) < (4e-3 if low else 2e-5)
    for g, rg in zip(grads, ref_grads):
        assert _rel_err(g, rg) < (2e-2 if low else 1e-4)


def _offset_view(shape, dtype, elements):
    """A contiguous tensor whose data starts ``elements`` past an allocation (defeats 16-byte alignment)."""
    numel = shape[0] * shape[1] * shape[2]
    return torch.randn(numel + elements, device="cuda").to(dtype)[elements:].view(shape)


@needs_ext
@pytest.mark.parametrize("d,misalign", [(4096, 0), (4100, 0), (4096, 1), (768, 0), (130, 0)],
                         ids=["16B", "8B-width", "unaligned", "d768", "d130"])
@pytest.mark.parametrize("dtypes", [(torch.bfloat16,) * 3, (torch.float32,) * 3,
                                    (torch.bfloat16, torch.float32, torch.bfloat16)], ids=["bf16", "fp32", "mixed"])
def test_handoff_vector_paths(d, misalign, dtypes):
    """Large widths take 16-byte accesses; widths or pointers that do not allow them take narrower ones."""
    hidden_dtype, memory_dtype, embeds_dtype = dtypes
    b, n, m = 4, 80, 8
    gen = torch.Generator(device="cuda").manual_seed(d)
    hidden = _offset_view((b, n, d), hidden_dtype, misalign).requires_grad_()
    memory = _offset_view((b, m, d), memory_dtype, misalign).requires_grad_()
    tok = _offset_view((b, n, d), embeds_dtype, misalign).requires_grad_()
    gather = torch.randint(0, n - m + 1, (b,), device="cuda", generator=gen)
    gather[0] = -1
    write = torch.randint(m, n - m + 1, (b,), device="cuda", generator=gen)
    outs, grads = [], []
    for fn in (lambda *a: segment_handoff(*a, backend="cuda"), segment_handoff_ref):
        new_mem, emb = fn(hidden, memory, gather, tok, 0, write)
        g = torch.autograd.grad((new_mem.float().sum() + (emb.float() ** 2).sum()), (hidden, memory, tok))
        outs.append((new_mem, emb))
        grads.append(g)
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
