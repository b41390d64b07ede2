"""The Triton memory attention (forward and backward) against ``memory_attention_ref`` on random layouts.

Runs the kernels in Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``, set here before anything imports
the kernels; conftest.py should set it too). On a GPU machine ``TRITON_INTERPRET=0 pytest <this file>`` runs the
compiled kernels on CUDA tensors instead.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from rmt_fast.ops import memory_attention  # noqa: E402
from rmt_fast.ops.reference import SegmentLayout, memory_attention_ref  # noqa: E402
from rmt_fast.ops.triton import attention as triton_attention  # noqa: E402
from rmt_fast.ops.triton.attention import memory_attention_triton  # noqa: E402

if triton_attention._INTERPRET:
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    pytest.skip(
        "rmt_fast.ops.triton.attention was imported before TRITON_INTERPRET=1 was set and there is no GPU: "
        "set TRITON_INTERPRET=1 in the environment (or in conftest.py) before triton kernels are imported",
        allow_module_level=True,
    )

TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-2, 2e-2), torch.bfloat16: (6e-2, 3e-2)}  # atol, rtol


def _make(b, hq, hkv, n, d, dtype, transposed, seed):
    """Random q, k, v (leaf tensors); ``transposed`` gives [B, N, H, D] storage viewed as [B, H, N, D] (HF)."""
    gen = torch.Generator().manual_seed(seed)

    def one(h):
        shape = (b, n, h, d) if transposed else (b, h, n, d)
        x = torch.randn(shape, generator=gen).to(device=DEVICE, dtype=dtype)
        x = x.transpose(1, 2) if transposed else x
        return x.requires_grad_(True)

    return one(hq), one(hkv), one(hkv)


def _check(q, k, v, layout, scale=None, via_dispatch=False):
    b, hq, n, d = q.shape
    gen = torch.Generator().manual_seed(n * 131 + d)
    dout = torch.randn(q.shape, generator=gen).to(device=DEVICE, dtype=q.dtype)

    if via_dispatch:
        out = memory_attention(q, k, v, layout, scale, backend="triton")
    else:
        out = memory_attention_triton(q, k, v, layout, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref = memory_attention_ref(q, k, v, layout, scale)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)

    atol, rtol = TOL[q.dtype]
    pos = torch.arange(n, device=DEVICE)
    valid = (pos[None, :] < layout.valid_lens.to(DEVICE)[:, None])[:, None, :, None]  # [B, 1, N, 1]
    torch.testing.assert_close(torch.where(valid, out, 0).float(), torch.where(valid, ref, 0).float(),
                               atol=atol, rtol=rtol)
    assert torch.all(out.masked_fill(valid, 0) == 0), "padding queries must output 0"
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert g.shape == rg.shape and g.dtype == rg.dtype
        assert torch.isfinite(g).all(), f"d{name} has non-finite values"
        torch.testing.assert_close(g.float(), rg.float(), atol=atol, rtol=rtol, msg=lambda m: f"d{name}: {m}")
        assert torch.all(g.masked_fill(valid, 0) == 0), f"d{name} must be exactly 0 at padding positions"


@st.composite
def _cases(draw):
    d = draw(st.sampled_from([16, 32, 64]))
    hkv = draw(st.integers(1, 2))
    groups = draw(st.integers(1, 2))
    b = draw(st.integers(1, 2))
    num_read = draw(st.sampled_from([0, 1, 3, 16, 20]))
    num_write = draw(st.sampled_from([0, 1, 3, 16, 20]))
    n = draw(st.integers(max(1, num_read + num_write), 80))
    lens = draw(st.lists(st.integers(0, n - num_read - num_write), min_size=b, max_size=b))
    causal = draw(st.booleans())
    bidir = causal and draw(st.booleans())
    dtype = draw(st.sampled_from([torch.float32, torch.float16]))
    transposed = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    return b, hkv * groups, hkv, n, d, num_read, num_write, lens, causal, bidir, dtype, transposed, seed


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_cases())
def test_matches_reference(case):
    b, hq, hkv, n, d, num_read, num_write, lens, causal, bidir, dtype, transposed, seed = case
    layout = SegmentLayout(num_read, num_write, torch.tensor(lens, device=DEVICE), causal, bidir)
    _check(*_make(b, hq, hkv, n, d, dtype, transposed, seed), layout)


@pytest.mark.parametrize("d", [80, 24])
def test_padded_head_dim(d):
    """Head dims that are not a power of two run with a padded D block and masked loads."""
    layout = SegmentLayout(4, 4, torch.tensor([30, 9], device=DEVICE), causal=True, memory_bidirectional=True)
    _check(*_make(2, 2, 1, 41, d, torch.float16, False, seed=d), layout)


@pytest.mark.parametrize("causal,bidir", [(False, False), (True, False), (True, True)])
def test_dispatch_bf16_gqa(causal, bidir):
    """Through the public entry point, bf16, 4 query heads on 2 kv heads, int64 seq_lens, custom scale."""
    layout = SegmentLayout(5, 5, torch.tensor([0, 50], device=DEVICE, dtype=torch.int64), causal, bidir)
    _check(*_make(2, 4, 2, 67, 32, torch.bfloat16, True, seed=7), layout, scale=0.3, via_dispatch=True)


def test_no_valid_position():
    """A row with no slot and no token is all padding: zero output, zero gradients."""
    layout = SegmentLayout(0, 0, torch.tensor([0, 20], device=DEVICE, dtype=torch.int32), causal=True)
    _check(*_make(2, 2, 2, 20, 16, torch.float32, False, seed=3), layout)


def test_rejects_bad_shapes():
    q, k, v = _make(1, 3, 2, 8, 16, torch.float32, False, seed=0)
    layout = SegmentLayout(0, 0, torch.tensor([8], device=DEVICE), causal=True)
    with pytest.raises(ValueError, match="multiple"):
        memory_attention_triton(q, k, v, layout)
    q, k, v = _make(1, 2, 2, 8, 160, torch.float32, False, seed=0)
    with pytest.raises(ValueError, match="head dim"):
        memory_attention_triton(q, k, v, layout)
