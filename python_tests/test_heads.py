"""Heads beyond LM and encoder classification: decoder classifiers, token classification, and clear errors."""
import pytest
import torch
import torch.nn.functional as F
from transformers import (BertConfig, BertForTokenClassification, GPT2Config, GPT2ForSequenceClassification,
                          GPT2Model, LlamaConfig, LlamaForSequenceClassification, LlamaModel)

import rmt_fast
from rmt_fast.experiments.official import official_encoder
from models import CLS, PAD, SEP, VOCAB, tokens


def gpt2_cls(num_labels=4):
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64, num_labels=num_labels,
                     pad_token_id=PAD)
    return GPT2ForSequenceClassification(cfg).eval()


def llama_cls(num_labels=3):
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=128, num_labels=num_labels,
                      pad_token_id=PAD)
    return LlamaForSequenceClassification(cfg).eval()


def bert_tok(num_labels=5):
    cfg = BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                     vocab_size=VOCAB, max_position_embeddings=40, num_labels=num_labels, pad_token_id=PAD)
    return BertForTokenClassification(cfg).eval()


def official_decoder_classifier(model, memory, ids, seg):
    """The decoder loop of the official code with a classification head on the last segment's last token."""
    m = memory.shape[0]
    mem = memory[None].expand(ids.shape[0], -1, -1)
    base = model.base_model
    h = None
    for s in ids.split(seg, dim=1):
        x = torch.cat([mem, base.get_input_embeddings()(s), mem], 1)
        h = base(inputs_embeds=x).last_hidden_state
        mem = h[:, -m:]
        last = h[:, m + s.shape[1] - 1]
    return model.score(last)


@pytest.mark.parametrize("make", [gpt2_cls, llama_cls])
@pytest.mark.parametrize("ckpt", [False, True])
def test_decoder_classifier_reads_last_token_of_last_segment(make, ckpt):
    model = make()
    rmt = rmt_fast.wrap(model, num_mem_tokens=3, segment_size=8, backend="reference", checkpoint_segments=ckpt)
    ids = tokens(2, 29)
    labels = torch.tensor([1, 2])
    out = rmt(ids, labels=labels)
    ref = official_decoder_classifier(model, rmt.memory, ids, 8)
    torch.testing.assert_close(out.logits, ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out.loss, F.cross_entropy(ref, labels), atol=2e-5, rtol=1e-4)
    out.loss.backward()
    assert rmt.memory.grad is not None and rmt.memory.grad.abs().sum() > 0


def test_decoder_classifier_rows_of_different_length_equal_running_alone():
    model = gpt2_cls()
    rmt = rmt_fast.wrap(model, num_mem_tokens=2, segment_size=7, backend="reference")
    ids = tokens(2, 30)
    mask = torch.ones_like(ids)
    mask[0, :11] = 0  # left padding: row 0 has 19 tokens
    both = rmt(ids, attention_mask=mask).logits
    alone = rmt(ids[:1, 11:]).logits
    torch.testing.assert_close(both[:1], alone, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("ckpt", [False, True])
def test_token_classification_logits_at_input_positions(ckpt):
    model = bert_tok()
    rmt = rmt_fast.wrap(model, num_mem_tokens=2, segment_size=9, cls_token_id=CLS, sep_token_id=SEP,
                        pad_token_id=PAD, backend="reference", checkpoint_segments=ckpt)
    ids = tokens(2, 30)
    labels = torch.randint(0, 5, (2, 30))
    labels[:, ::4] = -100
    out = rmt(ids, labels=labels)
    assert out.logits.shape == (2, 30, 5)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits.flatten(0, 1), labels.flatten()),
                               atol=1e-5, rtol=1e-5)  # HF's convention: the mean over labelled tokens
    # right-aligned segments (3 + 9 + 9 + 9 tokens): the last segment's logits equal the official encoder loop's
    # last segment at its token positions ([CLS] m memory [SEP] tokens)
    ref, _ = official_encoder(model, rmt.memory, ids, 9, CLS, SEP, PAD)
    torch.testing.assert_close(out.logits[:, -9:], ref.logits[:, 2 + 2:2 + 2 + 9], atol=2e-5, rtol=1e-4)
    out.loss.backward()
    assert rmt.memory.grad is not None


def test_bare_models_reject_labels():
    for model in (GPT2Model(GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64)),
                  LlamaModel(LlamaConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=4,
                                         intermediate_size=64, vocab_size=VOCAB))):
        rmt = rmt_fast.wrap(model, num_mem_tokens=2, segment_size=8)
        ids = tokens(1, 20)
        with pytest.raises(ValueError, match="labels"):
            rmt(ids, labels=ids)
        out = rmt(ids)
        assert out.last_hidden_state.shape == (1, 20, 32)  # token states at the input's positions


def test_unsupported_heads_are_refused_clearly():
    from transformers import BertForMaskedLM

    cfg = BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                     vocab_size=VOCAB, max_position_embeddings=40)
    with pytest.raises(ValueError, match="ForTokenClassification"):
        rmt_fast.wrap(BertForMaskedLM(cfg), num_mem_tokens=2, cls_token_id=CLS, sep_token_id=SEP)
