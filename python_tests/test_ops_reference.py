"""The reference ops against brute-force restatements of RMT.md's mask and handoff."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rmt_fast.ops import SegmentLayout, memory_attention, segment_handoff
from rmt_fast.ops.reference import memory_attention_ref, segment_handoff_ref


def brute_mask(layout, n):
    b = layout.seq_lens.shape[0]
    out = torch.zeros(b, n, n, dtype=torch.bool)
    r, w = layout.num_read, layout.num_write
    for row in range(b):
        L = int(layout.seq_lens[row])
        valid = r + L + w
        for i in range(valid):
            for j in range(valid):
                if not layout.causal:
                    ok = True
                else:
                    ok = j <= i
                    if layout.memory_bidirectional:
                        ok = ok or (i < r and j < r) or (i >= r + L and j >= r + L)
                out[row, i, j] = ok
    return out


@settings(max_examples=30, deadline=None)
@given(r=st.integers(0, 4), w=st.integers(0, 4), lens=st.lists(st.integers(0, 9), min_size=1, max_size=3),
       causal=st.booleans(), bidir=st.booleans(), extra=st.integers(0, 3))
def test_layout_mask_matches_definition(r, w, lens, causal, bidir, extra):
    layout = SegmentLayout(r, w, torch.tensor(lens), causal, bidir)
    n = r + w + max(lens) + extra
    assert torch.equal(layout.allowed(n), brute_mask(layout, n))


@settings(max_examples=20, deadline=None)
@given(r=st.integers(0, 3), w=st.integers(0, 3), lens=st.lists(st.integers(0, 7), min_size=1, max_size=3),
       causal=st.booleans(), bidir=st.booleans(), groups=st.sampled_from([1, 2]))
def test_memory_attention_ref_matches_masked_softmax(r, w, lens, causal, bidir, groups):
    layout = SegmentLayout(r, w, torch.tensor(lens), causal, bidir)
    n = r + w + max(lens) + 1
    b, hkv, d = len(lens), 2, 8
    q = torch.randn(b, hkv * groups, n, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, hkv, n, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, hkv, n, d, dtype=torch.float64, requires_grad=True)
    out = memory_attention_ref(q, k, v, layout)
    mask = brute_mask(layout, n)
    for row in range(b):
        for h in range(hkv * groups):
            s = (q[row, h] @ k[row, h // groups].T) / d ** 0.5
            for i in range(n):
                allowed = mask[row, i]
                if allowed.any():
                    p = torch.softmax(s[i][allowed], -1)
                    expect = p @ v[row, h // groups][allowed]
                else:
                    expect = torch.zeros(d, dtype=q.dtype)
                torch.testing.assert_close(out[row, h, i].double(), expect)
    out.sum().backward()
    valid = layout.valid_lens
    for row in range(b):
        assert torch.all(k.grad[row, :, int(valid[row]):] == 0)
        assert torch.all(v.grad[row, :, int(valid[row]):] == 0)


def test_memory_attention_noncausal_equals_sdpa_on_full_rows():
    q, k, v = (torch.randn(2, 4, 12, 16) for _ in range(3))
    layout = SegmentLayout(3, 0, torch.tensor([9, 9]), causal=False)
    torch.testing.assert_close(memory_attention(q, k, v, layout),
                               torch.nn.functional.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)
    causal = SegmentLayout(2, 2, torch.tensor([8, 8]), causal=True)
    torch.testing.assert_close(memory_attention(q, k, v, causal),
                               torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True),
                               atol=1e-5, rtol=1e-5)


def test_memory_attention_input_errors():
    layout = SegmentLayout(1, 1, torch.tensor([2]), causal=True)
    q = torch.randn(1, 3, 4, 8)
    with pytest.raises(ValueError, match="multiple"):
        memory_attention(q, torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), layout)
    with pytest.raises(ValueError, match="positions"):
        memory_attention(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8), layout)
    with pytest.raises(ValueError, match="backend"):
        memory_attention(q, q, q, layout, backend="flash")
    with pytest.raises(ValueError, match="num_read"):
        SegmentLayout(-1, 0, torch.tensor([1]), causal=True)
    with pytest.raises(TypeError, match="seq_lens"):
        SegmentLayout(1, 0, torch.tensor([1.0]), causal=True)
    with pytest.raises(ValueError, match="cuda"):
        memory_attention(q, q, q, SegmentLayout(1, 1, torch.tensor([2]), causal=True), backend="cuda")


def test_segment_handoff_ref_semantics():
    b, n_prev, n, m, d = 3, 10, 9, 2, 4
    hidden = torch.randn(b, n_prev, d, requires_grad=True)
    memory = torch.randn(b, m, d, requires_grad=True)
    tok = torch.randn(b, n, d, requires_grad=True)
    gather = torch.tensor([4, -1, 7])
    write = torch.tensor([5, 2, 7])
    new_mem, emb = segment_handoff(hidden, memory, gather, tok, 0, write)
    expect_mem = torch.stack([hidden[0, 4:6], memory[1], hidden[2, 7:9]])
    torch.testing.assert_close(new_mem, expect_mem)
    for row in range(b):
        e = tok[row].clone()
        e[0:m] = expect_mem[row]
        w = int(write[row])
        e[w:w + m] = expect_mem[row]
        torch.testing.assert_close(emb[row], e)
    (emb.sum() + new_mem.sum()).backward()
    assert torch.all(tok.grad[0, :m] == 0) and torch.all(tok.grad[0, 5:7] == 0) and torch.all(tok.grad[0, 2:5] == 1)
    assert torch.all(memory.grad[1] == 3) and torch.all(memory.grad[0] == 0)
    assert torch.all(hidden.grad[0, 4:6] == 3) and torch.all(hidden.grad[1] == 0)
    # encoder flavour: read slots after [CLS], no write slots; first segment has no hidden
    mem2, emb2 = segment_handoff_ref(None, memory, None, tok, 1, None)
    assert mem2 is memory
    torch.testing.assert_close(emb2[:, 1:1 + m], memory)
    torch.testing.assert_close(emb2[:, 0], tok[:, 0])
