"""rmt_fast against plain restatements of the official RMT loops (booydar/recurrent-memory-transformer).

The official decoder (MemoryCell + RecurrentWrapper) and encoder (RMTEncoderForSequenceClassification) loops are
written out below with the backbone's own attention (sdpa); rmt_fast routes attention through memory_attention.
For batches whose rows share one length the two must agree to float tolerance.
"""
import pytest
import torch
import torch.nn.functional as F

import rmt_fast
from models import CLS, PAD, SEP, bert, bert_cls, distilbert, gpt2, llama, roberta_cls, tokens

ATOL = 2e-5


def official_decoder(model, memory, input_ids, segment_size, labels=None):
    """MemoryCell/RecurrentWrapper: [mem | seg | mem], next memory = last hidden at the write slots."""
    m = memory.shape[0]
    b = input_ids.shape[0]
    mem = memory[None].expand(b, -1, -1)
    logits = []
    for seg in input_ids.split(segment_size, dim=1):
        emb = model.get_input_embeddings()(seg)
        x = torch.cat([mem, emb, mem], 1)
        out = model(inputs_embeds=x, output_hidden_states=True)
        mem = out.hidden_states[-1][:, -m:] if m else mem
        logits.append(out.logits[:, m:m + seg.shape[1]])
    logits = torch.cat(logits, 1)
    loss = None
    if labels is not None:
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
    return logits, mem, loss


def official_encoder(model, memory, input_ids, segment_size):
    """RMTEncoder: right-aligned segments, [CLS] mem [SEP] seg [SEP], memory from positions 1..m."""
    m = memory.shape[0]
    b, t = input_ids.shape
    bounds = (list(range(t, 0, -segment_size)) + [0])[::-1]
    mem = memory[None].expand(b, -1, -1)
    out = None
    for start, end in zip(bounds, bounds[1:]):
        seg = input_ids[:, start:end]
        ids = torch.cat([torch.full((b, 1), CLS), torch.full((b, m), PAD), torch.full((b, 1), SEP), seg,
                         torch.full((b, 1), SEP)], 1)
        emb = model.get_input_embeddings()(ids).clone()
        emb[:, 1:1 + m] = mem
        out = model(inputs_embeds=emb, output_hidden_states=True)
        mem = out.hidden_states[-1][:, 1:1 + m]
    return out, mem


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
    ref, ref_mem = official_encoder(model, rmt.memory, ids, s)
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
    ref, ref_mem = official_encoder(model, rmt.memory, ids, 10)
    torch.testing.assert_close(out.memory, ref_mem, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, atol=ATOL, rtol=1e-4)


def test_encoder_drops_special_tokens_like_official():
    model = bert_cls()
    rmt = rmt_fast.wrap(model, num_mem_tokens=2, cls_token_id=CLS, sep_token_id=SEP, pad_token_id=PAD)
    ids = tokens(1, 40)
    with_specials = torch.cat([torch.tensor([[CLS]]), ids, torch.tensor([[SEP]])], 1)
    torch.testing.assert_close(rmt(ids).logits, rmt(with_specials).logits)
