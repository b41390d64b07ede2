"""Conformance of memory_attention: every backend on this machine against the reference, forward and backward.

Backends: "reference" (the specification, itself checked against a brute-force restatement of the mask),
"sdpa" (plain layouts only), "triton" (compiled on a GPU; on the CPU under ``TRITON_INTERPRET=1``, which
conftest.py sets before anything imports triton), "cuda" (the rmt_fast._C extension and a GPU). Outputs are
compared at valid query positions only (padding outputs are unspecified); gradients are compared everywhere for
an output gradient that is zero at padding queries (nothing downstream reads them).
"""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from op_backends import DEVICE, TRITON, cuda_param
from rmt_fast.ops.memory_attention import SegmentLayout, fused_attention, mask_rule, memory_attention
from rmt_fast.ops.memory_attention.reference import memory_attention_ref

CUDA = cuda_param("memory_attention")
FUSED = [TRITON, CUDA]
ALL = ["reference", "sdpa", TRITON, CUDA]
MASKS = [(False, False), (True, False), (True, True)]
MASK_IDS = ["encoder", "causal", "bidirectional"]
TOL = {torch.float32: (2e-4, 2e-4), torch.float16: (2e-2, 2e-2), torch.bfloat16: (6e-2, 3e-2)}  # atol, rtol


# ---- the specification ---------------------------------------------------------------------------------------


def brute_mask(layout: SegmentLayout, n: int) -> torch.Tensor:
    """The RMT segment mask restated from its definition, one pair at a time."""
    b = layout.seq_lens.shape[0]
    out = torch.zeros(b, n, n, dtype=torch.bool)
    r, w = layout.num_read, layout.num_write
    for row in range(b):
        length = int(layout.seq_lens[row])
        valid = r + length + w
        for i in range(valid):
            for j in range(valid):
                ok = not layout.causal or j <= i
                if layout.causal and layout.memory_bidirectional:
                    ok = ok or (i < r and j < r) or (i >= r + length and j >= r + length)
                out[row, i, j] = ok
    return out


@settings(max_examples=30, deadline=None, derandomize=True)
@given(r=st.integers(0, 4), w=st.integers(0, 4), lens=st.lists(st.integers(0, 9), min_size=1, max_size=3),
       causal=st.booleans(), bidir=st.booleans(), extra=st.integers(0, 3))
def test_mask_rule_is_rmt_mask(r, w, lens, causal, bidir, extra):
    layout = SegmentLayout(r, w, torch.tensor(lens), causal, bidir)
    n = r + w + max(lens) + extra
    assert torch.equal(layout.allowed(n), brute_mask(layout, n))
    # the rule on plain ints, as a FlexAttention mask_mod calls it one pair at a time
    valid, write_start = r + lens[0] + w, r + lens[0]
    on_ints = [[bool(mask_rule(i, j, valid, r, write_start, causal, causal and bidir)) for j in range(n)]
               for i in range(n)]
    assert on_ints == layout.allowed(n)[0].tolist()


@settings(max_examples=20, deadline=None, derandomize=True)
@given(r=st.integers(0, 3), w=st.integers(0, 3), lens=st.lists(st.integers(0, 7), min_size=1, max_size=3),
       causal=st.booleans(), bidir=st.booleans(), groups=st.sampled_from([1, 2]))
def test_reference_is_masked_softmax(r, w, lens, causal, bidir, groups):
    layout = SegmentLayout(r, w, torch.tensor(lens), causal, bidir)
    n = r + w + max(lens) + 1
    b, hkv, d = len(lens), 2, 8
    q = torch.randn(b, hkv * groups, n, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, hkv, n, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, hkv, n, d, dtype=torch.float64, requires_grad=True)
    out = memory_attention_ref(q, k, v, layout)
    mask = brute_mask(layout, n)
    _assert_plain_softmax(out, q, k, v, mask, layout.valid_lens, groups)
    out.sum().backward()
    for row in range(b):
        valid = int(layout.valid_lens[row])
        assert torch.all(k.grad[row, :, valid:] == 0) and torch.all(v.grad[row, :, valid:] == 0)


def _assert_plain_softmax(out, q, k, v, mask, valid_lens, groups):
    """out at every valid query equals a softmax over the keys ``mask`` allows, head by head (GQA: ``groups`` query
    heads per key head)."""
    d = q.shape[-1]
    for row in range(q.shape[0]):
        for h in range(q.shape[1]):
            s = (q[row, h] @ k[row, h // groups].T) / d ** 0.5
            for i in range(int(valid_lens[row])):
                p = torch.softmax(s[i][mask[row, i]], -1)
                torch.testing.assert_close(out[row, h, i], p @ v[row, h // groups][mask[row, i]])


def test_layout_and_input_errors():
    layout = SegmentLayout(1, 1, torch.tensor([2]), causal=True)
    q = torch.randn(1, 3, 4, 8)
    with pytest.raises(ValueError, match="multiple"):
        memory_attention(q, torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), layout, backend="reference")
    with pytest.raises(ValueError, match="positions"):
        memory_attention(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8),
                         SegmentLayout(1, 1, torch.tensor([2]), causal=True, memory_bidirectional=True))
    with pytest.raises(ValueError, match="backend"):
        memory_attention(q, q, q, layout, backend="flash")
    with pytest.raises(ValueError, match="num_read"):
        SegmentLayout(-1, 0, torch.tensor([1]), causal=True)
    with pytest.raises(TypeError, match="seq_lens"):
        SegmentLayout(1, 0, torch.tensor([1.0]), causal=True)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda"):
            memory_attention(q, q, q, layout, backend="cuda")


# ---- the short-term cache: a key prefix --------------------------------------------------------------------------


def brute_cache_mask(layout: SegmentLayout, n: int) -> torch.Tensor:
    """The mask over keys ``[cache | segment]`` restated: the row's real cache keys (the last ``cache_lens[b]`` of
    the prefix) for every valid query, then the segment's own mask (:func:`brute_mask`)."""
    c = layout.num_cache
    b = layout.seq_lens.shape[0]
    lens = layout.cache_lens if layout.cache_lens is not None else torch.full((b,), c)
    out = torch.zeros(b, n, c + n, dtype=torch.bool)
    out[:, :, c:] = brute_mask(layout, n)
    for row in range(b):
        out[row, :int(layout.valid_lens[row]), c - int(lens[row]):c] = True
    return out


def _cache_layout(r, w, lens, causal, bidir, num_cache, cache_lens):
    cache_lens = None if cache_lens is None else torch.tensor(cache_lens)
    return SegmentLayout(r, w, torch.tensor(lens), causal, bidir, num_cache=num_cache, cache_lens=cache_lens)


@st.composite
def _cache_cases(draw):
    b = draw(st.integers(1, 3))
    num_cache = draw(st.integers(0, 5))
    cache_lens = draw(st.none() | st.lists(st.integers(0, num_cache), min_size=b, max_size=b))
    return dict(r=draw(st.integers(0, 3)), w=draw(st.integers(0, 3)),
                lens=draw(st.lists(st.integers(0, 7), min_size=b, max_size=b)), causal=draw(st.booleans()),
                bidir=draw(st.booleans()), num_cache=num_cache, cache_lens=cache_lens, extra=draw(st.integers(0, 2)))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(case=_cache_cases())
def test_mask_rule_with_cache_is_a_visible_key_prefix(case):
    extra = case.pop("extra")
    layout = _cache_layout(**case)
    n = case["r"] + case["w"] + max(case["lens"]) + extra
    allowed = layout.allowed(n)
    assert allowed.shape == (len(case["lens"]), n, case["num_cache"] + n)
    assert torch.equal(allowed, brute_cache_mask(layout, n))
    # the rule on plain ints, one pair at a time (FlexAttention's mask_mod over [cache | segment] keys)
    r, length, c = case["r"], case["lens"][0], case["num_cache"]
    start = c - (c if case["cache_lens"] is None else case["cache_lens"][0])
    on_ints = [[bool(mask_rule(i, j, r + length + case["w"], r, r + length, case["causal"],
                               case["causal"] and case["bidir"], c, start)) for j in range(c + n)] for i in range(n)]
    assert on_ints == allowed[0].tolist()


def test_cache_of_zero_is_the_plain_layout():
    """num_cache=0 (with or without cache_lens) is today's layout: the same mask, plainness and outputs."""
    for causal, bidir in MASKS:
        plain = _layout(2, 2, [5, 1], causal, bidir)
        zero = SegmentLayout(2, 2, torch.tensor([5, 1], device=DEVICE), causal, bidir, num_cache=0,
                             cache_lens=torch.tensor([0, 0], device=DEVICE))
        assert torch.equal(plain.allowed(10), zero.allowed(10)) and plain.is_plain == zero.is_plain
        q, k, v = _inputs(2, 2, 2, 10, 8, torch.float32, seed=11)
        assert torch.equal(memory_attention(q, k, v, plain), memory_attention(q, k, v, zero))


def _cache_inputs(case, groups):
    """(layout, q, k, v) of a ``_cache_cases`` draw: fp64 leaves, two k/v heads of dim 8, ``groups`` query heads
    per k/v head, one column more than the longest row, keys ``[cache | segment]``."""
    case = {k: v for k, v in case.items() if k != "extra"}
    layout = _cache_layout(**case)
    n = case["r"] + case["w"] + max(case["lens"]) + 1
    b, hkv, d, c = len(case["lens"]), 2, 8, case["num_cache"]
    q = torch.randn(b, hkv * groups, n, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, hkv, c + n, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, hkv, c + n, d, dtype=torch.float64, requires_grad=True)
    return layout, q, k, v


@settings(max_examples=20, deadline=None, derandomize=True)
@given(case=_cache_cases(), groups=st.sampled_from([1, 2]))
def test_reference_with_cache_is_attention_over_cache_and_segment(case, groups):
    """The reference against a dense softmax over the concatenated keys ``[cache | segment]``, one query at a time;
    gradients into padding cache keys (and padded segment keys) are exactly zero."""
    layout, q, k, v = _cache_inputs(case, groups)
    n = q.shape[2]
    out = memory_attention(q, k, v, layout, backend="reference")
    mask = brute_cache_mask(layout, n)
    _assert_plain_softmax(out, q, k, v, mask, layout.valid_lens, groups)
    valid = _valid_rows(layout, n).cpu()
    out.backward(valid.expand_as(out).double())
    unseen = ~mask.any(1)  # [B, C + N] keys no valid query attends
    assert torch.all(k.grad.masked_fill(~unseen[:, None, :, None], 0) == 0)
    assert torch.all(v.grad.masked_fill(~unseen[:, None, :, None], 0) == 0)


@pytest.mark.parametrize("backend", ["auto", *ALL])
def test_cache_backends(backend):
    """The reference, Triton, CUDA and "auto" compute a cache layout; "sdpa" refuses it."""
    layout = SegmentLayout(2, 2, torch.tensor([6, 3], device=DEVICE), True, num_cache=3,
                           cache_lens=torch.tensor([3, 1], device=DEVICE))
    assert not layout.is_plain
    q = torch.randn(2, 2, 10, 8, device=DEVICE)
    kv = torch.randn(2, 2, 13, 8, device=DEVICE)
    if backend != "sdpa":  # outputs at padding queries are unspecified (and differ between the backends)
        valid = _valid_rows(layout, 10)
        torch.testing.assert_close(memory_attention(q, kv, kv, layout, backend=backend).masked_fill(~valid, 0),
                                   memory_attention_ref(q, kv, kv, layout).masked_fill(~valid, 0))
    else:
        with pytest.raises(ValueError, match="backend"):
            memory_attention(q, kv, kv, layout, backend=backend)
    with pytest.raises(ValueError, match="num_cache"):
        memory_attention(q, q, q, layout, backend="reference")  # keys without the cache prefix


@settings(max_examples=30, deadline=None, derandomize=True)
@given(case=_cache_cases(), groups=st.sampled_from([1, 2]))
def test_masked_sdpa_equals_the_reference_on_any_layout(case, groups):
    """What "auto" runs for a cache layout on a GPU with neither Triton nor the CUDA extension (SDPA with the
    layout's boolean mask), on any layout with or without a cache: the reference's outputs at valid queries, finite
    outputs everywhere, and its gradients."""
    from rmt_fast.ops.memory_attention.sdpa import memory_attention_sdpa_masked

    layout, q, k, v = _cache_inputs(case, groups)
    n = q.shape[2]
    out = memory_attention_sdpa_masked(q, k, v, layout)
    ref = memory_attention_ref(q, k, v, layout)
    valid = _valid_rows(layout, n).cpu()
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.masked_fill(~valid, 0), ref.masked_fill(~valid, 0))
    g = torch.randn_like(out).masked_fill(~valid, 0)
    mine = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(ref, (q, k, v), g)
    for a, w in zip(mine, want):
        torch.testing.assert_close(a, w)


def test_cache_layout_errors():
    with pytest.raises(ValueError, match="num_cache"):
        SegmentLayout(1, 1, torch.tensor([2]), True, num_cache=-1)
    with pytest.raises(TypeError, match="cache_lens"):
        SegmentLayout(1, 1, torch.tensor([2]), True, num_cache=2, cache_lens=torch.tensor([1, 1]))
    with pytest.raises(TypeError, match="cache_lens"):
        SegmentLayout(1, 1, torch.tensor([2]), True, num_cache=2, cache_lens=torch.tensor([1.0]))


# ---- the dispatcher --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal,dense", [(True, False), (True, True), (False, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_auto_on_plain_layouts_is_exactly_sdpa(causal, dense, dtype):
    """What transformers' own SDPA path computes, bit for bit: "auto" sends plain layouts there on every device."""
    q = torch.randn(2, 4, 12, 16, device=DEVICE, dtype=dtype)
    k, v = (torch.randn(2, 2, 12, 16, device=DEVICE, dtype=dtype) for _ in range(2))
    lens = torch.tensor([8, 8] if dense else [8, 3], device=DEVICE)
    layout = SegmentLayout(2 if causal else 4, 2 if causal else 0, lens, causal=causal, dense=dense)
    for scale in (None, 0.3):
        want = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=True)
        assert torch.equal(memory_attention(q, k, v, layout, scale=scale), want)
        assert torch.equal(memory_attention(q, k, v, layout, scale=scale, backend="sdpa"), want)


def test_sdpa_needs_a_plain_layout():
    q = torch.randn(1, 2, 8, 8)
    for layout in (SegmentLayout(2, 2, torch.tensor([4]), causal=True, memory_bidirectional=True),
                   SegmentLayout(2, 0, torch.tensor([4]), causal=False)):
        assert not layout.is_plain
        with pytest.raises(ValueError, match="layout"):
            memory_attention(q, q, q, layout, backend="sdpa")
        # "auto" takes the masked path instead: same values as the reference
        torch.testing.assert_close(memory_attention(q, q, q, layout), memory_attention_ref(q, q, q, layout))


# ---- every backend against the reference ------------------------------------------------------------------------


def _inputs(b, hq, hkv, n, d, dtype, transposed=False, seed=0):
    """Leaf q, k, v; ``transposed`` stores them as [B, N, H, D] viewed as [B, H, N, D] (as HF hands them over)."""
    gen = torch.Generator().manual_seed(seed)

    def one(h):
        x = torch.randn((b, n, h, d) if transposed else (b, h, n, d), generator=gen).to(DEVICE, dtype)
        return (x.transpose(1, 2) if transposed else x).requires_grad_(True)

    return one(hq), one(hkv), one(hkv)


def _valid_rows(layout: SegmentLayout, n: int) -> torch.Tensor:
    """[B, 1, N, 1]: True at valid query positions."""
    pos = torch.arange(n, device=DEVICE)
    return (pos[None, :] < layout.valid_lens.to(DEVICE)[:, None])[:, None, :, None]


def check_backend(backend, q, k, v, layout, scale=None):
    """``backend`` against the reference: outputs at valid queries, and all gradients for an output gradient that is
    zero at padding queries; gradients into padded k/v must be exactly zero."""
    n = q.shape[2]
    valid = _valid_rows(layout, n)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(n)).to(DEVICE, q.dtype) * valid
    out = memory_attention(q, k, v, layout, scale, backend=backend)
    assert out.shape == q.shape and out.dtype == q.dtype
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref = memory_attention_ref(q, k, v, layout, scale)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    atol, rtol = TOL[q.dtype]
    torch.testing.assert_close(torch.where(valid, out, 0).float(), torch.where(valid, ref, 0).float(),
                               atol=atol, rtol=rtol)
    assert torch.isfinite(out).all(), "padding outputs may be anything, but finite"
    # keys some valid query attends (with a short-term cache the keys are [cache | segment])
    seen = layout.allowed(n).to(DEVICE).any(1)[:, None, :, None] if layout.num_cache else valid
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert g.shape == rg.shape and g.dtype == rg.dtype
        assert torch.isfinite(g).all(), f"d{name} has non-finite values"
        torch.testing.assert_close(g.float(), rg.float(), atol=atol, rtol=rtol, msg=lambda m: f"d{name}: {m}")
        if name != "q":
            assert torch.all(g.masked_fill(seen, 0) == 0), f"d{name} must be exactly 0 at padding positions"


def _layout(num_read, num_write, lens, causal, bidir, dense=False):
    return SegmentLayout(num_read, num_write, torch.tensor(lens, device=DEVICE), causal, bidir, dense=dense)


def _skip_if_unsupported(backend, layout, dtype):
    if backend == "sdpa" and not layout.is_plain:
        pytest.skip("sdpa takes plain layouts only")
    if backend == "sdpa" and DEVICE == "cpu" and dtype == torch.float16:
        pytest.skip("CPU SDPA in float16 is not a path anything takes")


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("causal,bidir", MASKS, ids=MASK_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_padded_rows_gqa(backend, causal, bidir, dtype):
    """Ragged rows (one full, one short, one with memory slots only), 4 query heads on 2 kv heads."""
    layout = _layout(3, 3, [27, 9, 0], causal, bidir)
    _skip_if_unsupported(backend, layout, dtype)
    check_backend(backend, *_inputs(3, 4, 2, 33, 32, dtype, transposed=True, seed=1), layout)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("causal,bidir", MASKS, ids=MASK_IDS)
def test_dense_rows(backend, causal, bidir):
    """Every row full: encoders are plain here (sdpa runs), causal layouts too without the bidirectional blocks."""
    layout = _layout(4, 0 if not causal else 4, [20, 20], causal, bidir, dense=True)
    _skip_if_unsupported(backend, layout, torch.float32)
    n = 24 if not causal else 28
    check_backend(backend, *_inputs(2, 2, 2, n, 16, torch.float32, seed=2), layout, scale=0.3)


@pytest.mark.parametrize("backend", ["reference", *FUSED])
def test_row_without_valid_position(backend):
    """A row with no slot and no token is all padding: finite outputs, zero gradients into it."""
    layout = _layout(0, 0, [0, 20], True, False)
    check_backend(backend, *_inputs(2, 2, 2, 20, 16, torch.float32, seed=3), layout)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("d", [24, 80, 128])
def test_head_dims_not_a_power_of_two(backend, d):
    layout = _layout(4, 4, [30, 9], True, True)
    check_backend(backend, *_inputs(2, 2, 1, 41, d, torch.float16, seed=d), layout)


@pytest.mark.parametrize("backend", FUSED)
def test_fused_padding_gradients_are_zero_for_any_output_gradient(backend):
    """Stronger than the contract: the masked kernels give padding queries probability 0, so even a gradient
    arriving at padding outputs leaves padded k/v untouched."""
    layout = _layout(2, 2, [11, 3], True, True)
    q, k, v = _inputs(2, 2, 2, 19, 16, torch.float32, seed=5)
    out = memory_attention(q, k, v, layout, backend=backend)
    _, dk, dv = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    pad = ~_valid_rows(layout, 19)
    assert torch.all(dk.masked_fill(~pad, 0) == 0) and torch.all(dv.masked_fill(~pad, 0) == 0)


@st.composite
def _cases(draw):
    num_read = draw(st.sampled_from([0, 1, 3, 16]))
    num_write = draw(st.sampled_from([0, 1, 3, 16]))
    n = draw(st.integers(max(1, num_read + num_write), 64))
    b = draw(st.integers(1, 2))
    lens = draw(st.lists(st.integers(0, n - num_read - num_write), min_size=b, max_size=b))
    causal = draw(st.booleans())
    hkv = draw(st.integers(1, 2))
    return dict(b=b, hq=hkv * draw(st.integers(1, 2)), hkv=hkv, n=n, d=draw(st.sampled_from([16, 32, 64])),
                layout=(num_read, num_write, lens, causal, causal and draw(st.booleans())),
                dtype=draw(st.sampled_from([torch.float32, torch.float16])), transposed=draw(st.booleans()),
                seed=draw(st.integers(0, 2 ** 16)))


@pytest.mark.parametrize("backend", FUSED)
@settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(case=_cases())
def test_random_layouts(backend, case):
    layout = _layout(*case["layout"])
    check_backend(backend, *_inputs(case["b"], case["hq"], case["hkv"], case["n"], case["d"], case["dtype"],
                                    case["transposed"], case["seed"]), layout)


# ---- the Triton backward's schedules ------------------------------------------------------------------------------

SCHEDULES = ["split", "fused", "stored"]
_NEEDS_TRITON = TRITON.marks[0]  # the skip mark of the "triton" backend param


def _triton_module():
    import rmt_fast.ops.memory_attention.triton as att

    return att


@contextlib.contextmanager
def _stored_backward(att, **fields):
    """The triton backend's stored schedule set to ``StoredBackward(**fields)`` inside the context."""
    previous = att.set_stored_backward(att.StoredBackward(**fields))
    try:
        yield
    finally:
        att.set_stored_backward(previous)


@_NEEDS_TRITON
def test_stored_backward_config():
    """The defaults of the stored schedule's tunables, their checks, and setting them process-wide."""
    att = _triton_module()
    assert att.StoredBackward() == att.StoredBackward(max_bytes=5 * 2 ** 28, streams=2, min_chunks=2)
    assert att.stored_backward() == att.StoredBackward()
    for fields, arg in [({"max_bytes": -1}, "max_bytes"), ({"max_bytes": 1.5}, "max_bytes"),
                        ({"streams": 3}, "streams"), ({"min_chunks": 0}, "min_chunks")]:
        with pytest.raises(ValueError, match=arg):
            att.StoredBackward(**fields)
    with pytest.raises(TypeError, match="StoredBackward"):
        att.set_stored_backward(2 ** 30)
    with _stored_backward(att, max_bytes=0):
        assert att.stored_backward() == att.StoredBackward(max_bytes=0)
    assert att.stored_backward() == att.StoredBackward()


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("causal,bidir", MASKS, ids=MASK_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@_NEEDS_TRITON
def test_triton_backward_schedules(schedule, causal, bidir, dtype):
    """Each schedule of the Triton backward, forced, against the reference: ragged rows, GQA, transposed inputs,
    a head dim below its tile (40), rows longer than one tile."""
    layout = _layout(3, 5, [27, 9, 0], causal, bidir)
    with _triton_module().backward_schedule(schedule):
        check_backend("triton", *_inputs(3, 4, 2, 37, 40, dtype, transposed=True, seed=11), layout)


@pytest.mark.parametrize("schedule", SCHEDULES)
@settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(case=_cases())
@_NEEDS_TRITON
def test_triton_backward_schedules_random_layouts(schedule, case):
    with _triton_module().backward_schedule(schedule):
        check_backend("triton", *_inputs(case["b"], case["hq"], case["hkv"], case["n"], case["d"], case["dtype"],
                                         case["transposed"], case["seed"]), _layout(*case["layout"]))


@pytest.mark.parametrize("schedule", ["split", "stored"])
@pytest.mark.parametrize("causal,bidir", MASKS, ids=MASK_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@_NEEDS_TRITON
def test_triton_tma_loads(schedule, causal, bidir, dtype):
    """Rows loaded through TMA tensor descriptors (forced; the forward and the split/stored backward), against the
    reference: ragged rows, GQA, transposed inputs, a head dim below its tile (40, zero-filled columns), rows past N
    (zero-filled)."""
    from rmt_fast.ops import launch

    att = _triton_module()
    layout = _layout(3, 5, [27, 9, 0], causal, bidir)
    inputs = _inputs(3, 4, 2, 37, 40, dtype, transposed=True, seed=12)
    with att.row_loads("tma"), att.backward_schedule(schedule):
        check_backend("triton", *inputs, layout)
        with launch.recording() as calls:  # the checked path really took descriptors
            q, k, v = (x.detach() for x in inputs)
            out, lse = att.forward(q, k, v, layout.seq_lens.to(q.device), 3, 5, causal, bidir, 0.2)
            att.backward(out, q, k, v, out, lse, layout.seq_lens.to(q.device), 3, 5, causal, bidir, 0.2)
    with_rows = [(fn, args, meta) for fn, _grid, args, meta in calls if "TMA" in meta]  # not the delta kernel
    kernels = {"split": {"_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel"},
               "stored": {"_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_stored_kernel"}}[schedule]
    assert {fn.__name__ for fn, _args, _meta in with_rows} == kernels  # stored on a GPU: a launch pair per chunk
    assert all(meta["TMA"] for _fn, _args, meta in with_rows)
    assert all(type(args[0]).__name__ == "TensorDescriptor" for _fn, args, _meta in with_rows)


@_NEEDS_TRITON
def test_triton_tma_failure_falls_back_to_pointer_loads(monkeypatch):
    """A Triton that cannot build TMA loads (simulated: every launch with TMA=True raises): one warning, the same
    results through pointer loads, and no further TMA attempts."""
    att = _triton_module()
    monkeypatch.setattr(att, "_tma_failed", None)
    tried = []

    def failing(launcher):
        def run(grid, *args, **meta):
            if meta.get("TMA"):
                tried.append(launcher.fn.__name__)
                raise RuntimeError("PassManager::run failed")
            return launcher(grid, *args, **meta)
        return run

    for name in ("_fwd", "_bwd_dq", "_bwd_dkdv", "_bwd_dq_stored"):
        monkeypatch.setattr(att, name, failing(getattr(att, name)))
    layout = _layout(2, 3, [20, 7], True, True)
    inputs = _inputs(2, 2, 2, 29, 16, torch.float32, seed=5)
    with att.row_loads("tma"), att.backward_schedule("stored"):
        with pytest.warns(RuntimeWarning, match="TMA row loads failed"):
            check_backend("triton", *inputs, layout)
        check_backend("triton", *inputs, layout)
    assert tried == ["_fwd_kernel"]  # the first failure turned TMA off for the backward and later calls too


@_NEEDS_TRITON
def test_triton_bad_input_keeps_tma_on(monkeypatch):
    """An error that the pointer path raises too (here: every launch fails) is the caller's: it propagates, no
    warning, and TMA stays on."""
    att = _triton_module()
    monkeypatch.setattr(att, "_tma_failed", None)

    def broken(grid, *args, **meta):
        raise RuntimeError("bad input")

    monkeypatch.setattr(att, "_fwd", broken)
    q = torch.zeros(1, 2, 16, 16, device=DEVICE)
    with att.row_loads("tma"), pytest.raises(RuntimeError, match="bad input"):
        att.forward(q, q, q, torch.full((1,), 16, dtype=torch.int32, device=DEVICE), 0, 0, True, False, 0.25)
    assert att._tma_failed is None


@pytest.mark.parametrize("loads", ["pointer", "tma"])
@pytest.mark.parametrize("causal,bidir", MASKS, ids=MASK_IDS)
@_NEEDS_TRITON
def test_triton_stored_schedule_reads_only_written_ds(loads, causal, bidir, monkeypatch):
    """The stored schedule's dQ kernel must read only the dS entries the dK/dV kernel wrote (or mask them out): the
    buffer starts as NaN, and the two kernels get different tiles (as on a GPU), for row counts that are not
    multiples of either; ragged rows, padding, GQA."""
    att = _triton_module()
    tiles = {"dkdv": {"BLOCK_M": 16, "BLOCK_N": 32}, "dq_stored": {"BLOCK_M": 32, "BLOCK_N": 16}}
    default = att._launch_config
    monkeypatch.setattr(att, "_launch_config", lambda kernel, d, dtype, long_rows=False: {
        **default(kernel, d, dtype, long_rows), **tiles.get(kernel, {})})
    monkeypatch.setattr(att, "_new_ds", lambda q, rows, np_: torch.full((rows, np_, np_), float("nan"),
                                                                         dtype=q.dtype, device=q.device))
    for n, lens in ((37, [27, 9, 0]), (70, [61, 40, 12])):
        layout = _layout(3, 5, lens, causal, bidir)
        with att.row_loads(loads), att.backward_schedule("stored"):
            check_backend("triton", *_inputs(3, 4, 2, n, 16, torch.float32, seed=n), layout)


def _run_stored_chunks(att, monkeypatch, hkv, streams, seed, transposed=False):
    """The stored schedule on ``streams`` streams with NaN-filled dS buffers: results against the reference under
    three masks (ragged rows, b=3, hq=4, n=37), then one backward recorded. Returns ``(buffer rows allocated,
    [(grid, args)] of the dK/dV launches, the same of the dQ launches)``."""
    from rmt_fast.ops import launch

    b, hq, n = 3, 4, 37
    buffers = []

    def new_ds(q, rows, np_):
        buffers.append(rows)
        return torch.full((rows, np_, np_), float("nan"), dtype=q.dtype, device=q.device)

    monkeypatch.setattr(att, "_new_ds", new_ds)
    for causal, bidir in MASKS:
        layout = _layout(3, 5, [27, 9, 0], causal, bidir)
        with att.backward_schedule("stored"), att.stored_streams(streams):
            check_backend("triton", *_inputs(b, hq, hkv, n, 16, torch.float32, transposed, seed), layout)
    q, k = torch.empty(b, hq, n, 16), torch.empty(b, hkv, n, 16)
    lse, lens = torch.empty(b, hq, n), torch.full((b,), n - 8, dtype=torch.int32)
    with launch.recording() as calls, att.backward_schedule("stored"), att.stored_streams(streams):
        att.backward(q, q, k, k, q, lse, lens, 3, 5, True, False, 0.25)
    dkdv = [(grid[0], args) for fn, grid, args, _meta in calls if fn.__name__ == "_bwd_dkdv_kernel"]
    dq = [(grid[0], args) for fn, grid, args, _meta in calls if fn.__name__ == "_bwd_dq_stored_kernel"]
    return buffers, dkdv, dq


def _check_chunk_launches(dkdv, dq, sizes, groups):
    """Launch i covers chunk i: grids of its pairs (dK/dV) and query heads (dQ), first pair PAIR0 / BH0."""
    assert [g for g, _args in dkdv] == sizes and [g for g, _args in dq] == [c * groups for c in sizes]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    assert [args[-5] for _g, args in dkdv] == starts  # PAIR0
    assert [args[-4] for _g, args in dq] == [st * groups for st in starts]  # BH0


@pytest.mark.parametrize("hkv,budget_pairs,chunk_sizes", [(2, 1, [1] * 6), (2, 2, [2, 2, 2]), (2, 4, [3, 3]),
                                                          (1, 2, [2, 1]), (2, 100, [6])])
@_NEEDS_TRITON
def test_triton_stored_schedule_in_chunks(hkv, budget_pairs, chunk_sizes, monkeypatch):
    """A dS budget below the whole problem: on one stream the stored schedule runs its (b, kv head) pairs in
    balanced chunks of whole GQA groups through one buffer of the chunk's size, with the same results (ragged rows,
    three masks, transposed inputs); the buffer starts as NaN, so a chunk that read another chunk's or an unwritten
    block would show."""
    att = _triton_module()
    groups = 4 // hkv  # 3 * hkv (b, kv head) pairs of 4 / hkv query heads
    with _stored_backward(att, max_bytes=budget_pairs * att._group_bytes(groups, 37, torch.float32)):
        buffers, dkdv, dq = _run_stored_chunks(att, monkeypatch, hkv, 1, seed=21, transposed=True)
    assert buffers and set(buffers) == {chunk_sizes[0] * groups}
    _check_chunk_launches(dkdv, dq, chunk_sizes, groups)


@pytest.mark.parametrize("budget_pairs,min_chunks,plan", [(100, 2, ([3, 3], 2)), (100, 4, ([2, 2, 1, 1], 2)),
                                                         (2, 2, ([1] * 6, 2)), (4, 2, ([2, 2, 2], 2)),
                                                         (5, 2, ([2, 2, 2], 2)), (1, 2, ([1] * 6, 1))])
@_NEEDS_TRITON
def test_triton_stored_schedule_on_two_streams(budget_pairs, min_chunks, plan, monkeypatch):
    """Two streams: each holds one dS slot of half the budget, chunk i runs on stream i % 2 through slot i % 2
    (its dK/dV launch writing and its dQ launch reading the same slot), at least ``min_chunks`` chunks of
    balanced sizes; one stream when one GQA group does not fit half the budget. On the CPU the streams are the
    caller's, in order; the results equal the reference with NaN-filled slots (three masks, ragged rows, GQA)."""
    att = _triton_module()
    hkv, groups, pairs = 2, 2, 6  # b=3, 4 query heads
    stored = att.StoredBackward(max_bytes=budget_pairs * att._group_bytes(groups, 37, torch.float32),
                                min_chunks=min_chunks)
    assert att._stored_plan(pairs, groups, 37, torch.float32, 2, stored) == plan
    assert att._stored_plan(pairs, groups, 37, torch.float32, 1, stored)[1] == 1
    sizes, streams = plan
    with _stored_backward(att, max_bytes=stored.max_bytes, min_chunks=min_chunks):
        buffers, dkdv, dq = _run_stored_chunks(att, monkeypatch, hkv, 2, seed=22)
    assert set(buffers) == {streams * sizes[0] * groups}
    _check_chunk_launches(dkdv, dq, sizes, groups)
    slots = [args[8].data_ptr() for _g, args in dkdv]
    assert slots == [args[1].data_ptr() for _g, args in dq]  # each chunk's dQ reads the slot its dK/dV wrote
    assert len(set(slots)) == streams and all(slots[i] == slots[i % streams] for i in range(len(sizes)))
    assert all(args[8].shape[0] == sizes[0] * groups for _g, args in dkdv)
    with pytest.raises(ValueError, match="count must be one of"):
        with att.stored_streams(3):
            pass


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and streams need a GPU")
def test_triton_stored_two_streams_in_cuda_graph():
    """The stored backward on two streams (a fork and a join inside the capture) captured in a CUDA graph: each
    replay equals the one-stream eager gradients, also after new inputs are copied into the captured buffers."""
    att = _triton_module()
    layout = _layout(3, 5, [180, 77, 0], True, True)
    q, k, v = _inputs(3, 4, 2, 256, 64, torch.bfloat16, seed=9)
    dout = torch.randn_like(q)

    def grads():
        return torch.autograd.grad(memory_attention(q, k, v, layout, backend="triton"), (q, k, v), dout)

    with att.backward_schedule("stored"):
        with att.stored_streams(1):
            want = grads()
        with att.stored_streams(2):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside the capture (compiles, the second stream)
                grads()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static = grads()
    graph.replay()
    for g, w in zip(static, want):
        torch.testing.assert_close(g, w, atol=0, rtol=0)
    with torch.no_grad():
        for x in (q, k, v, dout):
            x.copy_(torch.randn_like(x))
    with att.backward_schedule("stored"), att.stored_streams(1):
        want = grads()
    graph.replay()
    for g, w in zip(static, want):
        torch.testing.assert_close(g, w, atol=0, rtol=0)


def test_triton_launch_config_long_rows(monkeypatch):
    """The GPU tile table (read with the interpreter switched off): from LONG_ROWS rows on, the D > 64
    half-precision forward and stored dQ kernels take other tiles, and nothing else changes; the forward and the
    stored backward pick them by N (launches recorded, not run)."""
    from rmt_fast.ops import launch

    att = _triton_module()
    monkeypatch.setattr(att, "_INTERPRET", False)
    att._launch_config.cache_clear()
    try:
        cfg = att._launch_config
        for kernel in att.KERNELS:
            for d, dtype in ((64, torch.bfloat16), (128, torch.float32)):
                assert cfg(kernel, d, dtype, True) == cfg(kernel, d, dtype, False)
        changed = {k for k in att.KERNELS if cfg(k, 128, torch.bfloat16, True) != cfg(k, 128, torch.bfloat16, False)}
        assert changed == {"fwd", "dq_stored"}
        for n in (att.LONG_ROWS - 128, att.LONG_ROWS):
            q = torch.empty(1, 2, n, 128, dtype=torch.bfloat16)
            lse, lens = torch.empty(1, 2, n), torch.full((1,), n - 4, dtype=torch.int32)
            with launch.recording() as calls, att.backward_schedule("stored"):
                att.forward(q, q, q, lens, 2, 2, True, False, 0.1)
                att.backward(q, q, q, q, q, lse, lens, 2, 2, True, False, 0.1)
            meta = {fn.__name__: meta for fn, _grid, _args, meta in calls}
            for name, kernel in (("_fwd_kernel", "fwd"), ("_bwd_dq_stored_kernel", "dq_stored"),
                                 ("_bwd_dkdv_kernel", "dkdv")):
                want = cfg(kernel, 128, torch.bfloat16, n >= att.LONG_ROWS)
                assert {key: meta[name][key] for key in want} == want
    finally:
        att._launch_config.cache_clear()


def test_triton_stored_schedule_without_memory_falls_back_to_split(monkeypatch):
    """No room for the dS buffer (CUDA out of memory): the backward takes the split schedule."""
    from rmt_fast.ops import launch

    att = _triton_module()

    def oom(q, rows, np_):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(att, "_new_ds", oom)
    q = torch.empty(1, 2, 64, 16)
    lse, lens = torch.empty(1, 2, 64), torch.full((1,), 60, dtype=torch.int32)
    with launch.recording() as calls, att.backward_schedule("stored"):
        att.backward(q, q, q, q, q, lse, lens, 2, 2, True, False, 0.25)
    assert [fn.__name__ for fn, _grid, _args, _meta in calls] == ["_bwd_dq_kernel", "_bwd_dkdv_kernel"]


def test_triton_row_loads_choice():
    """The automatic choice of TMA loads: never on the CPU, nor for misaligned strides even when forced."""
    att = _triton_module()
    q = torch.empty(1, 2, 64, 16)
    assert not att._use_tma(10 ** 12, q)  # auto: not a CUDA tensor
    with att.row_loads("tma"):
        assert att._use_tma(1, q)
        assert not att._use_tma(1, torch.empty(1, 2, 64, 18)[..., :16])  # row stride 72 B: not a multiple of 16
        assert not att._use_tma(1, torch.empty(64 * 16 + 1)[1:].view(1, 1, 64, 16))  # base address off by 4 B
        assert not att._use_tma(1, torch.empty(1, 1, 64, 16).expand(1, 2, 64, 16))  # a broadcast head: stride 0
        assert att._use_tma(1, torch.empty(64, 16).expand(1, 1, 64, 16))  # stride 0 over a single element: fine
    with att.row_loads("pointer"):
        assert not att._use_tma(1, q)
    with pytest.raises(ValueError, match="mode must be one of"):
        with att.row_loads("fast"):
            pass


def test_triton_backward_schedule_choice():
    """Which kernels each schedule launches (recorded, not run, so no GPU is needed) and the automatic choice by
    problem size."""
    from rmt_fast.ops import launch

    att = _triton_module()

    def launched(n, schedule=None, max_bytes=None):
        q = torch.empty(1, 2, n, 16)
        lse, lens = torch.empty(1, 2, n), torch.full((1,), n - 4, dtype=torch.int32)
        stored = None if max_bytes is None else att.StoredBackward(max_bytes=max_bytes)
        with launch.recording() as calls, (att.backward_schedule(schedule) if schedule else contextlib.nullcontext()):
            att.backward(q, q, q, q, q, lse, lens, 2, 2, True, False, 0.25, stored=stored)
        return [fn.__name__ for fn, _grid, _args, _meta in calls]

    stored = ["_bwd_delta_kernel", "_bwd_dkdv_kernel", "_bwd_dq_stored_kernel"]
    assert launched(64, "split") == ["_bwd_dq_kernel", "_bwd_dkdv_kernel"]
    assert launched(64, "fused") == ["_bwd_fused_kernel"]
    assert launched(64, "stored") == stored
    assert launched(64) == ["_bwd_fused_kernel"]  # 2 * 64 * 64 * 16: far below FUSED_MAX_WORK
    big = int((att.FUSED_MAX_WORK / 32) ** 0.5) + 16  # above FUSED_MAX_WORK; dS of one head: 16512^2 fp32
    head = att._group_bytes(1, big, torch.float32)
    assert launched(big, max_bytes=head - 1) == ["_bwd_dq_kernel", "_bwd_dkdv_kernel"]  # not even one head: split
    assert launched(big, max_bytes=2 ** 40) == stored
    assert launched(big, max_bytes=head) == stored[:1] + stored[1:] * 2  # one head per chunk: two chunks
    assert launched(big, max_bytes=0) == ["_bwd_dq_kernel", "_bwd_dkdv_kernel"]
    assert head < att.StoredBackward().max_bytes < 2 * head and launched(big) == stored[:1] + stored[1:] * 2
    with _stored_backward(att, max_bytes=0):  # the process-wide setting, where no argument is given
        assert launched(big) == ["_bwd_dq_kernel", "_bwd_dkdv_kernel"]
    assert launched(big) == stored[:1] + stored[1:] * 2
    with pytest.raises(ValueError, match="name must be one of"):
        with att.backward_schedule("fast"):
            pass


# ---- the short-term cache on the fused kernels ---------------------------------------------------------------------


def _cache_layout_on(r, w, lens, causal, bidir, num_cache, cache_lens):
    """A cache layout on DEVICE (``_cache_layout`` builds them on the CPU, for the reference)."""
    return SegmentLayout(r, w, torch.tensor(lens, device=DEVICE), causal, bidir, num_cache=num_cache,
                         cache_lens=None if cache_lens is None else torch.tensor(cache_lens, device=DEVICE))


def _cache_kv_inputs(b, hq, hkv, n, num_cache, d, dtype, transposed=False, seed=0):
    """Leaf q ``[B, Hq, N, D]`` and k, v ``[B, Hkv, num_cache + N, D]`` (see ``_inputs``)."""
    q = _inputs(b, hq, hkv, n, d, dtype, transposed, seed)[0]
    _, k, v = _inputs(b, hq, hkv, num_cache + n, d, dtype, transposed, seed + 1)
    return q, k, v


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("causal,bidir", MASKS, ids=MASK_IDS)
@_NEEDS_TRITON
def test_triton_cache_schedules(schedule, causal, bidir):
    """A short-term cache on Triton against the reference, each backward schedule forced: 19 cache keys (more than
    one tile, the last one partial), rows with a full, a partial and an empty cache, ragged rows (one with memory
    slots only), GQA, transposed inputs; gradients into padding cache keys exactly 0."""
    layout = _cache_layout_on(2, 3, [13, 4, 0], causal, bidir, 19, [19, 5, 0])
    with _triton_module().backward_schedule(schedule):
        check_backend("triton", *_cache_kv_inputs(3, 2, 1, 19, 19, 16, torch.float32, True, seed=31), layout)


@pytest.mark.parametrize("causal,bidir", MASKS, ids=MASK_IDS)
@pytest.mark.parametrize("d", [16, 80])
@CUDA.marks[0]
def test_cuda_cache_layouts(causal, bidir, d):
    """A short-term cache on the CUDA kernels against the reference: 19 cache keys (one key tile and a part) with
    rows holding a full, a partial and an empty cache, ragged rows (one with memory slots only), GQA, transposed
    inputs; then 37 cache keys whose real part starts in the third key tile, over a segment longer than one query
    tile. Gradients into padding cache keys exactly 0."""
    layout = _cache_layout_on(2, 3, [13, 4, 0], causal, bidir, 19, [19, 5, 0])
    check_backend("cuda", *_cache_kv_inputs(3, 2, 1, 19, 19, d, torch.float32, True, seed=33), layout)
    layout = _cache_layout_on(3, 3, [40, 27], causal, bidir, 37, [37, 4])
    check_backend("cuda", *_cache_kv_inputs(2, 4, 2, 47, 37, d, torch.float32, seed=34), layout)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_fused_cache_half_precision(backend, dtype):
    """fp16 and bf16 through the same kernels: a cache whose first row starts mid-tile, a head dim below its tile."""
    layout = _cache_layout_on(2, 2, [10, 3], True, True, 24, [21, 24])
    check_backend(backend, *_cache_kv_inputs(2, 2, 1, 15, 24, 24, dtype, seed=32), layout)


@st.composite
def _triton_cache_cases(draw):
    num_read, num_write = draw(st.sampled_from([0, 1, 3])), draw(st.sampled_from([0, 1, 3]))
    n = draw(st.integers(max(1, num_read + num_write), 24))
    b = draw(st.integers(1, 2))
    num_cache = draw(st.sampled_from([1, 3, 16, 21]))
    cache_lens = draw(st.none() | st.lists(st.sampled_from([0, num_cache]) | st.integers(0, num_cache), min_size=b,
                                           max_size=b))
    causal = draw(st.booleans())
    hkv = draw(st.integers(1, 2))
    return dict(b=b, hq=hkv * draw(st.integers(1, 2)), hkv=hkv, n=n, d=draw(st.sampled_from([16, 24])),
                layout=(num_read, num_write,
                        draw(st.lists(st.integers(0, n - num_read - num_write), min_size=b, max_size=b)), causal,
                        causal and draw(st.booleans()), num_cache, cache_lens),
                dtype=draw(st.sampled_from([torch.float32, torch.float16])), transposed=draw(st.booleans()),
                seed=draw(st.integers(0, 2 ** 16)), schedule=draw(st.sampled_from(SCHEDULES)))


@pytest.mark.parametrize("backend", FUSED)
@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(case=_triton_cache_cases())
def test_fused_cache_random_layouts(backend, case):
    """Random cache layouts on the fused kernels against the reference: caches of 1 to 21 keys, empty, full and
    partial rows, ragged segments, the three masks, GQA, fp32 and fp16, any Triton backward schedule."""
    schedule = (_triton_module().backward_schedule(case["schedule"]) if backend == "triton"
                else contextlib.nullcontext())
    with schedule:
        check_backend(backend, *_cache_kv_inputs(case["b"], case["hq"], case["hkv"], case["n"],
                                                 case["layout"][5], case["d"], case["dtype"], case["transposed"],
                                                 case["seed"]), _cache_layout_on(*case["layout"]))


@pytest.mark.parametrize("backend", FUSED)
def test_fused_cache_of_zero_and_empty_caches(backend):
    """``num_cache=0`` (with cache_lens) runs the plain kernels: outputs and gradients bit for bit the plain
    layout's. A cache with no real entry in any row gives the plain layout's results over the segment's keys and
    exactly zero gradients into the cache."""
    for causal, bidir in MASKS:
        plain = _layout(2, 2, [9, 1], causal, bidir)
        zero = SegmentLayout(2, 2, plain.seq_lens, causal, bidir, num_cache=0,
                             cache_lens=torch.zeros(2, dtype=torch.int32, device=DEVICE))
        empty = SegmentLayout(2, 2, plain.seq_lens, causal, bidir, num_cache=5,
                              cache_lens=torch.zeros(2, dtype=torch.int32, device=DEVICE))
        q, k, v = _inputs(2, 2, 2, 14, 16, torch.float32, seed=13)
        dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(14)).to(DEVICE) * _valid_rows(plain, 14)

        def run(layout, k, v):
            out = memory_attention(q, k, v, layout, backend=backend)
            return (out, *torch.autograd.grad(out, (q, k, v), dout))

        want = run(plain, k, v)
        for got, w in zip(run(zero, k, v), want):
            assert torch.equal(got, w)
        k5, v5 = (torch.cat([torch.randn(2, 2, 5, 16, device=DEVICE), x.detach()], 2).requires_grad_() for x in (k, v))
        out, dq, dk, dv = run(empty, k5, v5)
        valid = _valid_rows(plain, 14)
        torch.testing.assert_close(torch.where(valid, out, 0), torch.where(valid, want[0], 0))
        torch.testing.assert_close(dq, want[1])
        for got, w in ((dk, want[2]), (dv, want[3])):
            assert torch.all(got[:, :, :5] == 0)
            torch.testing.assert_close(got[:, :, 5:], w)


@pytest.mark.parametrize("loads", ["pointer", "tma"])
@_NEEDS_TRITON
def test_triton_cache_stored_schedule_reads_only_written_ds(loads, monkeypatch):
    """The stored schedule with a cache keeps dS blocks of ``[CP + NP, NP]`` (the cache's rows first); they start as
    NaN and the dK/dV and dQ kernels get different tiles, so a dQ read of an entry the dK/dV kernel did not write
    would show. Pointer loads and TMA descriptors (forced; the cache kernels really take them)."""
    from rmt_fast.ops import launch

    att = _triton_module()
    tiles = {"dkdv": {"BLOCK_M": 16, "BLOCK_N": 32}, "dq_stored": {"BLOCK_M": 32, "BLOCK_N": 16}}
    default = att._launch_config
    monkeypatch.setattr(att, "_launch_config", lambda kernel, d, dtype, long_rows=False: {
        **default(kernel, d, dtype, long_rows), **tiles.get(kernel, {})})
    shapes = []

    def new_ds(q, rows, np_, key_rows=None):
        shapes.append((rows, key_rows, np_))
        return torch.full((rows, key_rows or np_, np_), float("nan"), dtype=q.dtype, device=q.device)

    monkeypatch.setattr(att, "_new_ds", new_ds)
    layout = _cache_layout_on(2, 3, [14, 5, 0], True, True, 21, [21, 9, 0])
    inputs = _cache_kv_inputs(3, 2, 1, 21, 21, 16, torch.float32, seed=41)
    with att.row_loads(loads), att.backward_schedule("stored"):
        check_backend("triton", *inputs, layout)
        with launch.recording() as calls:
            q, k, v = (x.detach() for x in inputs)
            lens, cache_lens = layout.seq_lens_int32, layout.cache_lens_int32
            out, lse = att.forward(q, k, v, lens, 2, 3, True, True, 0.25, 21, cache_lens)
            att.backward(out, q, k, v, out, lse, lens, 2, 3, True, True, 0.25, 21, cache_lens)
    # whole groups of 2 query heads (how many (b, kv head) pairs a chunk and its streams hold depends on the GPU;
    # under the interpreter: one chunk of all 3); CP + NP key rows
    assert shapes[0][0] % 2 == 0 and 2 <= shapes[0][0] <= 16 and shapes[0][1:] == (128 + 128, 128)
    names = {fn.__name__ for fn, _grid, _args, _meta in calls}
    assert names == {"_fwd_cache_kernel", "_bwd_delta_kernel", "_bwd_dkdv_cache_kernel", "_bwd_dq_stored_cache_kernel"}
    with_rows = [(args, meta) for _fn, _grid, args, meta in calls if "TMA" in meta]
    assert all(meta["TMA"] == (loads == "tma") for _args, meta in with_rows)


@pytest.mark.parametrize("backend", FUSED)
def test_fused_cache_custom_op_registration(backend):
    """The custom ops with a cache (num_cache, cache_lens): schema, fake tensors, autograd, AOT tracing."""
    q, k, v = _cache_kv_inputs(2, 2, 1, 12, 5, 16, torch.float32, transposed=True, seed=6)
    seq_lens = torch.tensor([6, 3], dtype=torch.int32, device=DEVICE)
    cache_lens = torch.tensor([5, 2], dtype=torch.int32, device=DEVICE)
    torch.library.opcheck(fused_attention, (q, k, v, seq_lens, 2, 2, True, True, 0.25, backend, 5, cache_lens),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                      "test_aot_dispatch_dynamic"))


@_NEEDS_TRITON
def test_triton_cache_fullgraph_compile():
    """torch.compile traces a cache layout built inside the function through the custom op, with the eager results
    and gradients."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def f(q, k, v, lens, cache_lens):
        layout = SegmentLayout(2, 2, lens, causal=True, memory_bidirectional=True, num_cache=6, cache_lens=cache_lens)
        return memory_attention(q, k, v, layout, backend="triton")

    q, k, v = _cache_kv_inputs(2, 2, 1, 14, 6, 16, torch.float32, seed=8)
    lens, cache_lens = torch.tensor([10, 3], device=DEVICE), torch.tensor([6, 2], device=DEVICE)
    out = torch.compile(f, fullgraph=True, backend=record)(q, k, v, lens, cache_lens)
    ops = {node.target for gm in graphs for node in gm.graph.nodes if node.op == "call_function"}
    assert torch.ops.rmt_fast.memory_attention.default in ops
    want = f(q, k, v, lens, cache_lens)
    valid = _valid_rows(SegmentLayout(2, 2, lens, causal=True), 14)
    torch.testing.assert_close(torch.where(valid, out, 0), torch.where(valid, want, 0))
    grads = torch.autograd.grad(out, (q, k, v), valid.expand_as(out).float())
    for g, w in zip(grads, torch.autograd.grad(want, (q, k, v), valid.expand_as(out).float())):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_fused_cache_in_cuda_graph(backend):
    """A cache layout on the fused kernels captured in a CUDA graph (no host synchronisation in the launch path):
    each replay equals the eager outputs and gradients, also after new inputs and cache lengths are copied into the
    captured buffers."""
    layout = _cache_layout_on(2, 2, [40, 9], True, True, 24, [24, 7])
    q, k, v = _cache_kv_inputs(2, 4, 2, 48, 24, 64, torch.bfloat16, seed=9)
    dout = torch.randn_like(q)

    def step():
        out = memory_attention(q, k, v, layout, backend=backend)
        return (out, *torch.autograd.grad(out, (q, k, v), dout))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (compiles)
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    for new_lens in ([24, 7], [0, 24]):
        with torch.no_grad():
            for x in (q, k, v, dout):
                x.copy_(torch.randn_like(x))
            layout.cache_lens_int32.copy_(torch.tensor(new_lens, device=DEVICE))
        graph.replay()
        want = step()
        for g, w in zip(static, want):
            torch.testing.assert_close(g, w, atol=0, rtol=0)


@pytest.mark.parametrize("backend", FUSED)
def test_fused_input_errors(backend):
    layout = _layout(0, 0, [8], True, False)
    q, k, v = _inputs(1, 3, 2, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="multiple"):
        memory_attention(q, k, v, layout, backend=backend)
    q = torch.zeros(1, 2, 8, 160, device=DEVICE)
    with pytest.raises(ValueError, match="head dim"):
        memory_attention(q, q, q, layout, backend=backend)
    q = torch.zeros(1, 2, 8, 16, device=DEVICE, dtype=torch.float64)
    with pytest.raises(ValueError, match="dtype"):
        memory_attention(q, q, q, layout, backend=backend)


# ---- the custom op and torch.compile -----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", FUSED)
def test_custom_op_registration(backend):
    """Schema, fake (meta) implementation, autograd registration and AOT tracing of rmt_fast::memory_attention."""
    q, k, v = _inputs(2, 2, 1, 20, 16, torch.float32, transposed=True, seed=6)
    seq_lens = torch.tensor([12, 3], dtype=torch.int32, device=DEVICE)
    torch.library.opcheck(fused_attention, (q, k, v, seq_lens, 2, 2, True, True, 0.25, backend),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                      "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("backend", ["reference", *FUSED])
def test_fullgraph_compile(backend):
    """torch.compile traces a function that builds a layout and calls memory_attention in one graph, through the
    custom op for the fused backends, with the eager results and gradients."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def f(q, k, v, lens):
        layout = SegmentLayout(3, 3, lens, causal=True, memory_bidirectional=True)
        return memory_attention(q, k, v, layout, backend=backend)

    q, k, v = _inputs(2, 2, 2, 20, 16, torch.float32, seed=7)
    lens = torch.tensor([12, 4], device=DEVICE)
    out = torch.compile(f, fullgraph=True, backend=record)(q, k, v, lens)
    ops = {node.target for gm in graphs for node in gm.graph.nodes if node.op == "call_function"}
    if backend != "reference":
        assert torch.ops.rmt_fast.memory_attention.default in ops
    want = f(q, k, v, lens)
    valid = _valid_rows(SegmentLayout(3, 3, lens, causal=True), 20)
    torch.testing.assert_close(torch.where(valid, out, 0), torch.where(valid, want, 0))
    grads = torch.autograd.grad(out, (q, k, v), valid.expand_as(out).float())
    want_grads = torch.autograd.grad(want, (q, k, v), valid.expand_as(out).float())
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w)
    aot = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, lens)
    torch.testing.assert_close(torch.where(valid, aot, 0), torch.where(valid, want, 0))


# ---- the CUDA kernels' tile bounds, on the host ------------------------------------------------------------------


def test_cuda_row_mask_tile_bounds(tmp_path):
    """csrc/tests/row_mask_bounds.cu: the tile bounds the CUDA kernels take from RowMask (csrc/row_mask.cuh) cover
    every allowed (query, key) pair of every small layout, with and without a short-term cache, and stay in range.
    Compiled by nvcc and run on the host: no GPU needed, only nvcc."""
    import shutil
    import subprocess
    from pathlib import Path

    from rmt_fast.ops import cuda as cuda_ext

    nvcc = cuda_ext.find_nvcc() or shutil.which("nvcc", path="/usr/local/cuda-13.0/bin")
    if nvcc is None:
        pytest.skip("no nvcc")
    csrc = Path(__file__).resolve().parents[2] / "csrc"
    exe = tmp_path / "row_mask_bounds"
    build = subprocess.run([nvcc, "-std=c++17", "-O2", "-I", str(csrc), str(csrc / "tests" / "row_mask_bounds.cu"),
                            "-o", str(exe)], capture_output=True, text=True, timeout=600)
    if build.returncode and "unsupported" in build.stderr.lower():  # a host compiler this nvcc does not take
        pytest.skip(f"nvcc cannot build host code here: {build.stderr.strip().splitlines()[-1]}")
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.startswith("PASS"), run.stdout
