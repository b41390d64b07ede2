"""Conformance of segment_handoff: every backend on this machine against the reference, forward and backward,
in its three call forms (gather and place; gather only, as after the last segment; place only, as before the first).

Backends: "reference" (the specification, itself checked by hand below), "triton" (compiled on a GPU; on the CPU
under ``TRITON_INTERPRET=1``, which conftest.py sets), "cuda" (the rmt_fast._C extension and a GPU).
"""
from __future__ import annotations


import pytest
import torch

from op_backends import DEVICE, INTERPRET, TRITON, cuda_param
from rmt_fast.ops.segment_handoff import fused_gather, fused_place, segment_handoff
from rmt_fast.ops.segment_handoff.reference import segment_handoff_ref

CUDA = cuda_param("segment_handoff")
FUSED = [TRITON, CUDA]
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def test_reference_semantics():
    b, n_prev, n, m, d = 3, 10, 9, 2, 4
    hidden = torch.randn(b, n_prev, d, requires_grad=True)
    memory = torch.randn(b, m, d, requires_grad=True)
    tok = torch.randn(b, n, d, requires_grad=True)
    gather = torch.tensor([4, -1, 7])
    write = torch.tensor([5, 2, 7])
    new_mem, emb = segment_handoff(hidden, memory, gather, tok, 0, write, backend="reference")
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
    # encoder flavour: read slots after [CLS], no write slots; no hidden: the memory is passed through
    mem2, emb2 = segment_handoff_ref(None, memory, None, tok, 1, None)
    assert mem2 is memory
    torch.testing.assert_close(emb2[:, 1:1 + m], memory)
    torch.testing.assert_close(emb2[:, 0], tok[:, 0])


def _case(b, n_prev, n, m, d, dtypes, read_offset, with_write, seed):
    """Leaf tensors and offsets; row 0 keeps its memory (gather offset -1)."""
    gen = torch.Generator().manual_seed(seed)
    hidden_dtype, memory_dtype, embeds_dtype = dtypes

    def leaf(shape, dtype):
        return torch.randn(shape, generator=gen).to(DEVICE, dtype).requires_grad_(True)

    hidden, memory, tok = leaf((b, n_prev, d), hidden_dtype), leaf((b, m, d), memory_dtype), leaf((b, n, d), embeds_dtype)
    gather = torch.randint(0, n_prev - m + 1, (b,), generator=gen)
    gather[0] = -1
    write = torch.randint(read_offset + m, n - m + 1, (b,), generator=gen) if with_write else None
    return hidden, memory, gather.to(DEVICE), tok, read_offset, None if write is None else write.to(DEVICE)


def _run(backend, form, hidden, memory, gather, tok, read_offset, write):
    """The outputs and the gradients into (hidden, memory, tok) of one call form."""
    if form == "both":
        outs = segment_handoff(hidden, memory, gather, tok, read_offset, write, backend=backend)
    elif form == "gather":
        outs = segment_handoff(hidden, memory, gather, None, read_offset, None, backend=backend)
        assert outs[1] is None
    else:
        outs = segment_handoff(None, memory, None, tok, read_offset, write, backend=backend)
        assert outs[0] is memory
    outs = [o for o in outs if o is not None and o.requires_grad]
    gen = torch.Generator().manual_seed(11)
    weights = [torch.randn(o.shape, generator=gen).to(DEVICE, o.dtype) for o in outs]
    grads = torch.autograd.grad(outs, (hidden, memory, tok), weights, allow_unused=True)
    return [o.detach() for o in outs], grads


DTYPES = [(F32, F32, F32), (F16, F16, F16), (BF16, BF16, BF16), (BF16, F32, BF16), (F32, F16, BF16)]
DTYPE_IDS = ["fp32", "fp16", "bf16", "bf16-fp32mem", "mixed"]


@pytest.mark.parametrize("backend", ["reference", "sdpa", *FUSED])
@pytest.mark.parametrize("form", ["both", "gather", "place"])
@pytest.mark.parametrize("read_offset,with_write", [(0, True), (1, False)], ids=["decoder", "encoder"])
@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
def test_matches_reference(backend, form, read_offset, with_write, dtypes):
    """Outputs bit for bit ("sdpa" names no handoff kernel: it runs the reference); gradients to rounding.

    Triton's interpreter converts float32 to bfloat16 by truncation (a GPU rounds to nearest even): there, mixed
    dtypes match to one bfloat16 ulp."""
    args = _case(b=3, n_prev=21, n=18, m=3, d=40, dtypes=dtypes, read_offset=read_offset, with_write=with_write,
                 seed=5)
    outs, grads = _run(backend, form, *args)
    ref_outs, ref_grads = _run("reference", form, *args)
    truncates = backend == "triton" and INTERPRET and len(set(dtypes)) > 1
    for got, want in zip(outs, ref_outs):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, atol=0, rtol=2 ** -7 if truncates else 0)
    low = any(t != F32 for t in dtypes)
    for name, got, want in zip(("hidden", "memory", "token_embeds"), grads, ref_grads):
        if got is None or want is None:
            assert got is None or bool((got == 0).all()), name
            assert want is None or bool((want == 0).all()), name
            continue
        assert got.dtype == want.dtype, name
        torch.testing.assert_close(got, want, atol=2e-2 if low else 1e-6, rtol=2e-2 if low else 1e-6,
                                   msg=lambda s: f"{name}: {s}")


@pytest.mark.parametrize("backend", ["reference", *FUSED])
@pytest.mark.parametrize("d", [8, 24, 64, 130])
def test_widths(backend, d):
    """Widths that do and do not fill 16-byte vectors (bf16 gradients: sums of two slots, in another order)."""
    args = _case(b=2, n_prev=12, n=12, m=2, d=d, dtypes=(BF16, BF16, BF16), read_offset=0, with_write=True,
                 seed=d)
    outs, grads = _run(backend, "both", *args)
    ref_outs, ref_grads = _run("reference", "both", *args)
    for got, want in zip(outs, ref_outs):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("backend", ["reference", *FUSED])
def test_no_slots(backend):
    memory = torch.zeros(2, 0, 8, device=DEVICE)
    hidden, tok = torch.randn(2, 10, 8, device=DEVICE), torch.randn(2, 10, 8, device=DEVICE)
    new_mem, out = segment_handoff(hidden, memory, torch.tensor([1, 2], device=DEVICE), tok, 0, None, backend=backend)
    assert new_mem is memory and out is tok


@pytest.mark.parametrize("backend", ["reference", *FUSED])
def test_argument_errors(backend):
    memory, tok = torch.zeros(2, 4, 8, device=DEVICE), torch.randn(2, 10, 8, device=DEVICE)
    with pytest.raises(ValueError, match="read_offset"):
        segment_handoff(None, memory, None, tok, 7, None, backend=backend)
    with pytest.raises(ValueError, match="gather_offsets"):
        segment_handoff(tok, memory, None, tok, 0, None, backend=backend)


@pytest.mark.parametrize("backend", FUSED)
def test_custom_op_registration(backend):
    hidden, memory, gather, tok, read_offset, write = _case(b=2, n_prev=9, n=12, m=2, d=16, dtypes=(F32, F32, F32),
                                                            read_offset=0, with_write=True, seed=3)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(fused_gather, (hidden, memory, gather, backend), test_utils=utils)
    torch.library.opcheck(fused_place, (memory, tok, read_offset, write, backend), test_utils=utils)
    torch.library.opcheck(fused_place, (memory, tok, 1, None, backend), test_utils=utils)


@pytest.mark.parametrize("backend", ["reference", *FUSED])
def test_fullgraph_compile(backend):
    """The recurrence's two halves in one compiled graph, through the custom ops for the fused backends."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def halves(hidden, memory, gather, tok, write):
        new_memory, _ = segment_handoff(hidden, memory, gather, None, 0, None, backend=backend)
        _, embeds = segment_handoff(None, new_memory, None, tok, 0, write, backend=backend)
        return new_memory, embeds

    hidden, memory, gather, tok, _, write = _case(b=2, n_prev=9, n=12, m=2, d=16, dtypes=(F32, F32, F32),
                                                  read_offset=0, with_write=True, seed=4)
    got = torch.compile(halves, fullgraph=True, backend=record)(hidden, memory, gather, tok, write)
    ops = {node.target for gm in graphs for node in gm.graph.nodes if node.op == "call_function"}
    if backend != "reference":
        assert {torch.ops.rmt_fast.gather_memory.default, torch.ops.rmt_fast.place_memory.default} <= ops
    want = halves(hidden, memory, gather, tok, write)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=0, rtol=0)
    got = torch.compile(halves, fullgraph=True, backend="aot_eager")(hidden, memory, gather, tok, write)
    grads = torch.autograd.grad(got[0].sum() + got[1].pow(2).sum(), (hidden, memory, tok))
    want_grads = torch.autograd.grad(want[0].sum() + want[1].pow(2).sum(), (hidden, memory, tok))
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w)
