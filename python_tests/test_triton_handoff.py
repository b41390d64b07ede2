"""The Triton segment handoff (interpreted on CPU) against the reference, forward and backward."""
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 (set in conftest) or a GPU", allow_module_level=True)
pytest.importorskip("triton")

from rmt_fast.ops import segment_handoff  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@settings(max_examples=12, deadline=None)
@given(b=st.integers(1, 3), m=st.integers(0, 4), d=st.sampled_from([8, 24, 64]), n=st.integers(8, 14),
       decoder=st.booleans(), first=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float16]))
def test_handoff_matches_reference(b, m, d, n, decoder, first, dtype):
    g = torch.Generator().manual_seed(b * 100 + m * 10 + n)
    n_prev = n + 2
    hidden = torch.randn(b, n_prev, d, generator=g).to(DEV, dtype).requires_grad_(True)
    memory = torch.randn(b, m, d, generator=g).to(DEV, dtype).requires_grad_(True)
    tok = torch.randn(b, n, d, generator=g).to(DEV, dtype).requires_grad_(True)
    gather = torch.randint(-1, n_prev - m + 1, (b,), generator=g).to(DEV)
    read_offset = 0 if decoder else 1
    write = torch.randint(m, n - m + 1, (b,), generator=g).to(DEV) if decoder and n >= 2 * m else None
    hid = None if first else hidden
    outs = {}
    for backend in ("reference", "triton"):
        mem, emb = segment_handoff(hid, memory, gather, tok, read_offset, write, backend=backend)
        w = torch.randn(emb.shape, generator=torch.Generator().manual_seed(1)).to(DEV, dtype)
        wm = torch.randn(mem.shape, generator=torch.Generator().manual_seed(2)).to(DEV, dtype)
        grads = torch.autograd.grad((emb * w).sum() + (mem * wm).sum(), [t for t in (hidden, memory, tok)],
                                    allow_unused=True)
        outs[backend] = (mem.detach(), emb.detach(), grads)
    (m0, e0, g0), (m1, e1, g1) = outs["reference"], outs["triton"]
    torch.testing.assert_close(m1, m0)
    torch.testing.assert_close(e1, e0)
    for a, r in zip(g1, g0):
        if a is None or r is None:
            assert (a is None or bool((a == 0).all())) and (r is None or bool((r == 0).all()))
        else:
            torch.testing.assert_close(a, r, atol=1e-3, rtol=1e-3)


def test_handoff_read_only():
    hidden = torch.randn(2, 9, 16, device=DEV)
    memory = torch.randn(2, 3, 16, device=DEV)
    off = torch.tensor([2, -1], device=DEV)
    a, _ = segment_handoff(hidden, memory, off, None, 0, None, backend="triton")
    r, _ = segment_handoff(hidden, memory, off, None, 0, None, backend="reference")
    torch.testing.assert_close(a, r)
