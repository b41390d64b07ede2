"""The fused Llama-block kernels (rmt_fast/ops/block_kernels.py) against the HuggingFace code they replace, on
random shapes and dtypes: the CPU runs them under the Triton interpreter (fp32, fp16), a GPU adds bf16."""
import pytest
import torch
from transformers.models.llama import modeling_llama as ml

from op_backends import DEVICE, TRITON

bk = pytest.importorskip("rmt_fast.ops.block_kernels")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def _ulp(dtype):  # one rounding step of the output dtype (values here are O(1))
    return {torch.float32: dict(atol=2e-6, rtol=2e-6), torch.float16: dict(atol=2e-3, rtol=1e-3),
            torch.bfloat16: dict(atol=1.6e-2, rtol=8e-3)}[dtype]


def _tol(dtype):  # RMSNorm's mean is summed in another order: at most one rounding step of the output
    return dict(atol=0, rtol=0) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("backend", [TRITON])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 7, 40), (1, 64), (2, 1, 5, 96), (0, 8)])
@pytest.mark.parametrize("weight_dtype", ["same", "float32"])
def test_rms_norm_equals_llama(backend, dtype, shape, weight_dtype):
    torch.manual_seed(0)
    d = shape[-1]
    norm = ml.LlamaRMSNorm(d, eps=1e-5).to(DEVICE, dtype if weight_dtype == "same" else torch.float32)
    norm.weight.data.normal_()
    x = (torch.randn(shape, device=DEVICE) * 3).to(dtype)
    with torch.no_grad():
        want = norm(x)
        got = bk.rms_norm(x, norm.weight, norm.variance_epsilon)
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, **(dict(atol=2e-6, rtol=2e-6) if want.dtype == torch.float32
                                             and dtype == torch.float32 else _tol(dtype)))


def test_rms_norm_strided_rows():
    x = torch.randn(4, 6, 24, device=DEVICE).transpose(0, 1)  # rows not contiguous
    w = torch.randn(24, device=DEVICE)
    want = ml.LlamaRMSNorm(24)
    want.weight.data.copy_(w)
    torch.testing.assert_close(bk.rms_norm(x, w, want.variance_epsilon), want.to(DEVICE)(x), atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("backend", [TRITON])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,hq,hkv,n,d,cos_batch", [(2, 4, 2, 5, 16, 1), (1, 3, 3, 9, 20, 1), (3, 2, 1, 4, 8, 3),
                                                    (2, 12, 4, 33, 64, 2)])
@pytest.mark.parametrize("layout", ["bnhd", "contiguous"])
def test_rotary_equals_llama(backend, dtype, b, hq, hkv, n, d, cos_batch, layout):
    if cos_batch not in (1, b):
        pytest.skip("cos batch must be 1 or B")
    torch.manual_seed(1)

    def heads(h):  # as the attention layers make them: a transposed view of [B, N, H, D], or contiguous
        x = torch.randn(b, n, h, d, device=DEVICE).to(dtype)
        return x.transpose(1, 2) if layout == "bnhd" else x.transpose(1, 2).contiguous()

    q, k = heads(hq), heads(hkv)
    cos = torch.randn(cos_batch, n, d, device=DEVICE).to(dtype)
    sin = torch.randn(cos_batch, n, d, device=DEVICE).to(dtype)
    want_q, want_k = ml.apply_rotary_pos_emb(q, k, cos, sin)
    got_q, got_k = bk.rotary(q, cos, sin), bk.rotary(k, cos, sin)
    for got, want, x in ((got_q, want_q, q), (got_k, want_k, k)):
        assert got.dtype == dtype and got.shape == x.shape and got.stride() == x.stride()
        # the same roundings; a GPU contracts the fp32 multiply-adds (FMA), so one rounding step apart at most
        torch.testing.assert_close(got, want, **_ulp(dtype))


@pytest.mark.parametrize("backend", [TRITON])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 50), (2, 7, 2048 + 5), (0, 4)])
def test_silu_mul_equals_torch(backend, dtype, shape):
    torch.manual_seed(2)
    g = (torch.randn(shape, device=DEVICE) * 4).to(dtype)
    u = torch.randn(shape, device=DEVICE).to(dtype)
    want = torch.nn.functional.silu(g) * u
    got = bk.silu_mul(g, u)
    assert got.dtype == dtype and got.shape == want.shape
    # exp differs by an ulp between libraries; in fp16/bf16 that rarely moves a rounding step
    torch.testing.assert_close(got, want, **(dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else _tol(dtype)))
