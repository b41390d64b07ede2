"""The two-sweep checkpointed BPTT (rmt_fast/bptt.py) against full BPTT: same loss, same gradients, flat memory."""
import pytest
import torch

import rmt_fast
from models import CLS, PAD, SEP, bert_cls, gpt2, llama, tokens
from checkpointing import grads_with_and_without_checkpointing


def _assert_same(a, b):
    (l0, m0, p0), (l1, m1, p1) = a, b
    torch.testing.assert_close(l0, l1, atol=0, rtol=0)  # the forward sweep computes the same thing
    torch.testing.assert_close(m0, m1, atol=1e-6, rtol=1e-4)
    assert p0.keys() == p1.keys() and len(p0) > 0
    for n in p0:
        torch.testing.assert_close(p0[n], p1[n], atol=1e-6, rtol=1e-4, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("depth", [None, 1, 3])
@pytest.mark.parametrize("dropout", [False, True])
def test_decoder_gradients_equal_full_bptt(depth, dropout):
    model = gpt2(tie_word_embeddings=False) if dropout else gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    ids = tokens(2, 45)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # one left-padded row: rows end in different segments
    a, b = grads_with_and_without_checkpointing(model, ids, ids, mask=mask, seed=7 if dropout else None, num_mem_tokens=3, segment_size=8,
                  bptt_depth=depth)
    _assert_same(a, b)


@pytest.mark.parametrize("depth", [None, 1])
def test_llama_gqa_gradients_equal_full_bptt(depth):
    model = llama()
    ids = tokens(2, 37)
    a, b = grads_with_and_without_checkpointing(model, ids, ids, num_mem_tokens=2, segment_size=10, bptt_depth=depth, keep_logits=False)
    _assert_same(a, b)


@pytest.mark.parametrize("depth", [None, 1, 3])
@pytest.mark.parametrize("dropout", [False, True])
def test_encoder_classifier_gradients_equal_full_bptt(depth, dropout):
    model = bert_cls() if dropout else bert_cls(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ids = tokens(3, 50)
    mask = torch.ones_like(ids)
    mask[0, -9:] = 0
    a, b = grads_with_and_without_checkpointing(model, ids, torch.tensor([1, 4, 2]), mask=mask, seed=3 if dropout else None, num_mem_tokens=2,
                  segment_size=9, bptt_depth=depth, cls_token_id=CLS, sep_token_id=SEP, pad_token_id=PAD)
    _assert_same(a, b)


def test_frozen_memory_still_trains_the_backbone():
    model = gpt2(resid_pdrop=0.0, embd_pdrop=0.0)
    rmt = rmt_fast.wrap(model, num_mem_tokens=2, segment_size=8, checkpoint_segments=True, keep_logits=False)
    rmt.memory.requires_grad_(False)
    ids = tokens(2, 30)
    rmt(ids, labels=ids).loss.backward()
    assert model.get_input_embeddings().weight.grad is not None


def _saved_bytes(rmt, ids, labels):
    """Bytes of the distinct storages autograd keeps for backward after one forward (input ids excepted)."""
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if not (t.dtype in (torch.long, torch.int) and t.numel() >= ids.numel()):
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = rmt(ids, labels=labels)
    return sum(seen.values()), out


@pytest.mark.parametrize("ckpt", [True, False])
def test_checkpointed_forward_keeps_a_few_memory_states_per_segment(ckpt):
    model = gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    b, m, d, s = 2, 3, 32, 8
    rmt = rmt_fast.wrap(model, num_mem_tokens=m, segment_size=s, checkpoint_segments=ckpt, keep_logits=False)
    rmt.train()
    small, _ = _saved_bytes(rmt, *([tokens(b, 4 * s)] * 2))
    large, out = _saved_bytes(rmt, *([tokens(b, 20 * s)] * 2))
    per_segment = (large - small) / 16
    state = b * m * d * 4
    if ckpt:
        assert per_segment <= 3 * state, (per_segment, state)
        out.loss.backward()  # and the backward still works from what was kept
    else:
        assert per_segment > 20 * state, (per_segment, state)


@pytest.mark.parametrize("reentrant", [None, False, True])
def test_each_parameter_gradient_arrives_once(reentrant):
    """The two-sweep backward returns each parameter's gradient once (summed over the segments), as full BPTT:
    a tensor hook and a post-accumulate hook fire once per backward, and torch.autograd.grad reaches the
    parameters. Also with activation checkpointing inside the segments, reentrant or not (the recompute of a
    reentrant checkpoint runs inside the segment's backward, on the parameters' aliases too)."""
    model = gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    ids = tokens(2, 40)
    grads, memory = {}, None
    for ckpt in (False, True):
        rmt = rmt_fast.wrap(model, num_mem_tokens=2, segment_size=8, checkpoint_segments=ckpt).train()
        memory = rmt.memory.detach().clone() if memory is None else memory
        rmt.memory.data.copy_(memory)
        if reentrant is not None:
            rmt.gradient_checkpointing_enable({"use_reentrant": reentrant})
        weight = model.transformer.h[0].mlp.c_fc.weight
        calls = []
        handles = [weight.register_hook(lambda g: calls.append("tensor")),
                   weight.register_post_accumulate_grad_hook(lambda p: calls.append("accumulated"))]
        model.zero_grad(set_to_none=True)
        rmt(ids, labels=ids).loss.backward()
        if ckpt or not reentrant:  # full BPTT with reentrant checkpoints: one nested backward per layer call
            assert calls == ["tensor", "accumulated"], (ckpt, calls)
        if not reentrant:  # reentrant checkpoints refuse torch.autograd.grad
            (by_grad,) = torch.autograd.grad(rmt(ids, labels=ids).loss, [weight])
            torch.testing.assert_close(by_grad, weight.grad, atol=1e-7, rtol=1e-5)
        grads[ckpt] = weight.grad.clone()
        for h in handles:
            h.remove()
        if reentrant is not None:
            rmt.gradient_checkpointing_disable()
    torch.testing.assert_close(grads[True], grads[False], atol=1e-6, rtol=1e-4)
