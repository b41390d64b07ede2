"""rmt_fast against the plain restatements of the official RMT loops (rmt_fast/experiments/official.py).

The official loops run with the backbone's own attention (sdpa); rmt_fast routes attention through
memory_attention. For batches whose rows share one length the two must agree to float tolerance.
"""
import pytest
import torch
import torch.nn.functional as F

import rmt_fast
from rmt_fast.experiments.official import official_decoder, official_encoder
from models import CLS, PAD, SEP, bert, bert_cls, distilbert, gpt2, llama, roberta_cls, tokens

ATOL = 2e-5


@pytest.mark.parametrize("make,m,s,t", [(gpt2, 3, 8, 21), (gpt2, 4, 16, 16), (llama, 2, 10, 33), (gpt2, 0, 7, 20)])
def test_decoder_matches_official(make, m, s, t):
    model = make()
    rmt = rmt_fast.wrap(model, num_mem_tokens=m, segment_size=s, backend="reference")
    ids = tokens(2, t)
    out = rmt(ids, labels=ids)
    ref_logits, ref_mem, ref_loss = official_decoder(model, rmt.memory, ids, s, labels=ids)
    torch.testing.assert_close(out.logits, ref_logits, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(out.memory, ref_mem, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(out.loss, ref_loss, atol=ATOL, rtol=1e-4)
    # gradients too
    if m:
        out.loss.backward()
        g_ours = rmt.memory.grad.clone()
        rmt.memory.grad = None
        official_decoder(model, rmt.memory, ids, s, labels=ids)[2].backward()
        torch.testing.assert_close(g_ours, rmt.memory.grad, atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("make,m,t", [(bert_cls, 4, 70), (bert_cls, 2, 33), (roberta_cls, 3, 50)])
def test_encoder_classifier_matches_official(make, m, t):
    model = make()
    rmt = rmt_fast.wrap(model, num_mem_tokens=m, cls_token_id=CLS, sep_token_id=SEP, pad_token_id=PAD,
                        backend="reference")
    s = rmt.rmt_config.segment_size
    ids = tokens(3, t)
    labels = torch.tensor([0, 1, 2])
    out = rmt(ids, labels=labels)
    ref, ref_mem = official_encoder(model, rmt.memory, ids, s, CLS, SEP, PAD)
    torch.testing.assert_close(out.logits, ref.logits, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(out.memory, ref_mem, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(out.loss, F.cross_entropy(ref.logits, labels), atol=ATOL, rtol=1e-4)
    assert out.num_segments == -(-t // s)


@pytest.mark.parametrize("make", [bert, distilbert])
def test_bare_encoder_matches_official(make):
    model = make()
    rmt = rmt_fast.wrap(model, num_mem_tokens=3, segment_size=10, cls_token_id=CLS, sep_token_id=SEP,
                        pad_token_id=PAD, backend="reference")
    ids = tokens(2, 27)
    out = rmt(ids)
    ref, ref_mem = official_encoder(model, rmt.memory, ids, 10, CLS, SEP, PAD)
    torch.testing.assert_close(out.memory, ref_mem, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, atol=ATOL, rtol=1e-4)


def test_encoder_drops_special_tokens_like_official():
    model = bert_cls()
    rmt = rmt_fast.wrap(model, num_mem_tokens=2, cls_token_id=CLS, sep_token_id=SEP, pad_token_id=PAD)
    ids = tokens(1, 40)
    with_specials = torch.cat([torch.tensor([[CLS]]), ids, torch.tensor([[SEP]])], 1)
    torch.testing.assert_close(rmt(ids).logits, rmt(with_specials).logits)
