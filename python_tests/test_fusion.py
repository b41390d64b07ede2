"""rmt_fast/fusion.py: the fused block kernels inside a wrapped Llama-family backbone run only during rmt_fast's
inference calls and give the model's own results (CPU: under the Triton interpreter, fusion.ALLOW_CPU)."""
import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM, Qwen3Config, Qwen3ForCausalLM
from transformers.models.llama import modeling_llama as ml

import rmt_fast
from rmt_fast import fusion
from rmt_fast.ops import block_kernels
from models import VOCAB, gpt2, llama, tokens

pytestmark = pytest.mark.skipif(not rmt_fast.ops.triton_available(), reason="triton does not import")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def calls(monkeypatch):
    """Counts of each kernel's calls; the kernels may run on CPU tensors (interpreter)."""
    if DEVICE == "cpu":
        import os

        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("the CPU runs Triton kernels only under TRITON_INTERPRET=1")
        monkeypatch.setattr(fusion, "ALLOW_CPU", True)
    counts = {"rms_norm": 0, "rotary": 0, "silu_mul": 0}
    for name in counts:
        fn = getattr(block_kernels, name)

        def spy(*a, _fn=fn, _name=name, **k):
            counts[_name] += 1
            return _fn(*a, **k)

        monkeypatch.setattr(block_kernels, name, spy)
    return counts


def unfused_then_fused(model, memory, run, fused_graphed: bool = False) -> dict:
    """``run(rmt)`` for an RMT over ``model`` with fused_kernels False, then True (the same memory; eager, or the
    fused one graphed); {fused: result}, and the last RMT under "rmt"."""
    outs = {}
    for fused in (False, True):
        rmt = rmt_fast.wrap(model, num_mem_tokens=memory.shape[0], segment_size=16, fused_kernels=fused,
                            cuda_graphs=fused and fused_graphed)
        rmt.memory.data = memory.clone()
        outs[fused] = run(rmt)
    outs["rmt"] = rmt
    return outs


def mistral():
    cfg = MistralConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=128, sliding_window=None)
    return MistralForCausalLM(cfg).eval()


def qwen3():
    cfg = Qwen3Config(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=128)
    return Qwen3ForCausalLM(cfg).eval()


@pytest.mark.parametrize("make", [llama, mistral, qwen3], ids=["llama", "mistral", "qwen3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else []))
def test_fused_inference_equals_model_code(make, dtype, calls):
    torch.manual_seed(0)
    model = make().to(DEVICE, dtype)
    ids = tokens(2, 45).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # a left-padded row: ragged segments
    memory = torch.randn(3, model.config.hidden_size, device=DEVICE).to(dtype)

    def run(rmt):
        if rmt.rmt_config.fused_kernels:
            assert sum(calls.values()) == 0  # nothing fused while the unfused RMT ran
        with torch.no_grad():
            return rmt(ids, attention_mask=mask, labels=ids)

    outs = unfused_then_fused(model, memory, run)
    per_segment = 3  # segments of this input
    layers = model.config.num_hidden_layers
    norms_per_layer = 4 if make is qwen3 else 2  # Qwen3 also norms q and k per head
    assert calls["rms_norm"] == per_segment * (layers * norms_per_layer + 1)
    assert calls["rotary"] == 2 * per_segment * layers and calls["silu_mul"] == per_segment * layers
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(outs[True].logits, outs[False].logits, **tol)
    torch.testing.assert_close(outs[True].loss, outs[False].loss, **tol)


def test_fused_only_inside_rmt_no_grad(calls):
    model = llama().to(DEVICE)
    rmt = rmt_fast.wrap(model, num_mem_tokens=2, segment_size=16, cuda_graphs=False)
    ids = tokens(1, 20).to(DEVICE)
    with torch.no_grad():
        model(ids)  # the bare backbone: its own code
    assert sum(calls.values()) == 0
    rmt(ids, labels=ids).loss.backward()  # training: no backward in the kernels, the model's code
    assert sum(calls.values()) == 0
    plain = rmt_fast.wrap(model, num_mem_tokens=2, segment_size=16, cuda_graphs=False, fused_kernels=False)
    with torch.no_grad():
        plain(ids)  # the same (installed) backbone under an RMT that does not fuse
    assert sum(calls.values()) == 0
    with torch.inference_mode():
        rmt(ids)
    assert calls["rms_norm"] > 0 and calls["rotary"] > 0 and calls["silu_mul"] > 0


def test_install_scope_and_uninstall():
    model = llama()
    assert fusion.install(model) == ["rms_norm", "rotary", "swiglu"]
    assert fusion.install(model) == ["rms_norm", "rotary", "swiglu"]  # idempotent
    norm = model.model.norm
    assert "forward" in norm.__dict__
    assert ml.apply_rotary_pos_emb.rmt_fast_original is not None
    fusion.uninstall(model)
    assert "forward" not in norm.__dict__
    assert fusion.install(gpt2()) == []  # a model without these pieces: nothing installed
    assert fusion.install(llama(), ("rms_norm",)) == ["rms_norm"]  # only what the family lists (Phi-3: norms)
    with pytest.raises(ValueError, match="pieces"):
        fusion.install(llama(), ("gelu",))
    assert rmt_fast.wrap(llama(), num_mem_tokens=2, segment_size=16).adapter.fused
    assert not rmt_fast.wrap(gpt2(), num_mem_tokens=2, segment_size=16).adapter.fused  # no fused_blocks
    assert not rmt_fast.wrap(llama(), num_mem_tokens=2, segment_size=16, fused_kernels=False).adapter.fused
    with pytest.raises(TypeError, match="fused_kernels"):
        rmt_fast.wrap(llama(), num_mem_tokens=2, segment_size=16, fused_kernels="yes")


def test_fused_kernels_saved_with_the_config(tmp_path):
    rmt = rmt_fast.wrap(llama(), num_mem_tokens=2, segment_size=16, fused_kernels=False)
    rmt.save_pretrained(tmp_path)
    again = rmt_fast.from_pretrained(tmp_path)
    assert again.rmt_config.fused_kernels is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_fused_kernels_in_cuda_graphs(calls):
    """Graphed inference (the default on CUDA) captures the fused kernels; same outputs as unfused eager."""
    torch.manual_seed(0)
    model = llama().cuda().to(torch.bfloat16)
    ids = tokens(2, 64).cuda()
    memory = torch.randn(3, 32, device="cuda", dtype=torch.bfloat16)

    def run(rmt):
        with torch.no_grad():
            for _ in range(3):  # warm-up and capture, then replays
                out = rmt(ids, labels=ids)
        return out

    outs = unfused_then_fused(model, memory, run, fused_graphed=True)  # unfused eager against fused graphed
    assert calls["rotary"] > 0
    torch.testing.assert_close(outs[True].logits, outs[False].logits, atol=3e-2, rtol=3e-2)


def test_fused_generation_equals_model_code(calls):
    """Streaming generation (decode steps against the KV cache) through the fused kernels: the same tokens."""
    torch.manual_seed(0)
    model = llama().to(DEVICE)
    ids = tokens(2, 37).to(DEVICE)
    memory = torch.randn(3, 32, device=DEVICE)
    outs = unfused_then_fused(model, memory, lambda rmt: rmt.generate(ids, max_new_tokens=5, eos_token_id=[]))
    assert calls["rotary"] > 0
    assert torch.equal(outs[True], outs[False])


def test_fused_with_peft_lora(calls):
    """A PEFT LoRA backbone (adapters on the attention and MLP projections): the fused MLP calls the wrapped
    projections, so inference equals the model's code; training still runs the model's code."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = peft.get_peft_model(llama(), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                         target_modules=["q_proj", "v_proj", "gate_proj"]))
    model = model.to(DEVICE)
    ids = tokens(2, 40).to(DEVICE)
    memory = torch.randn(3, 32, device=DEVICE)

    def run(rmt):
        with torch.no_grad():
            return rmt(ids, labels=ids)

    outs = unfused_then_fused(model, memory, run)
    rmt = outs["rmt"]
    assert calls["silu_mul"] > 0
    torch.testing.assert_close(outs[True].logits, outs[False].logits, atol=1e-5, rtol=1e-5)
    n = sum(calls.values())
    rmt(ids, labels=ids).loss.backward()
    assert sum(calls.values()) == n
    assert any(p.grad is not None for n_, p in model.named_parameters() if "lora_" in n_)


def test_a_failing_kernel_falls_back_once_with_a_warning(calls, monkeypatch):
    """A kernel that raises (e.g. Triton cannot build it for this GPU): one warning, then the model's code, same
    results."""
    model = llama().to(DEVICE)
    ids = tokens(1, 20).to(DEVICE)
    rmt = rmt_fast.wrap(model, num_mem_tokens=2, segment_size=16, cuda_graphs=False)
    with torch.no_grad():
        want = rmt(ids).logits

    def broken(*a, **k):
        raise RuntimeError("no kernel for this GPU")

    monkeypatch.setattr(block_kernels, "rms_norm", broken)
    monkeypatch.setattr(fusion, "_failed", False)
    with pytest.warns(RuntimeWarning, match="fused block kernels failed"), torch.no_grad():
        got = rmt(ids).logits
    assert fusion._failed
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    n = calls["rotary"]
    with torch.no_grad():
        rmt(ids)
    assert calls["rotary"] == n  # off for the process


def test_segment_active_nests_and_is_per_thread():
    """The flag that lets the kernels run is scoped to the thread inside segment_active: a nested call restores
    the outer setting, and another thread entering and leaving its own segment call meanwhile changes nothing
    here (a module global flipped by both would)."""
    import threading

    inner_entered, outer_checked = threading.Event(), threading.Event()
    seen = {}

    def other_thread():
        seen["start"] = fusion._active.get()
        with fusion.segment_active(False):
            inner_entered.set()
            outer_checked.wait(5)
        seen["end"] = fusion._active.get()

    assert fusion._active.get() is False
    with fusion.segment_active(True):
        with fusion.segment_active(False):
            assert fusion._active.get() is False
        assert fusion._active.get() is True
        thread = threading.Thread(target=other_thread)
        thread.start()
        assert inner_entered.wait(5)
        assert fusion._active.get() is True  # the other thread is inside segment_active(False)
        outer_checked.set()
        thread.join(5)
        assert fusion._active.get() is True
    assert fusion._active.get() is False and seen == {"start": False, "end": False}
