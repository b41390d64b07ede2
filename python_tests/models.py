"""Tiny random backbones shared by the tests (no downloads)."""
import torch
from transformers import (BertConfig, BertForSequenceClassification, BertModel, DistilBertConfig,
                          DistilBertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          RobertaConfig, RobertaForSequenceClassification)

VOCAB = 97
CLS, SEP, PAD = 1, 2, 0


def gpt2(positions=64, **kw):
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=positions,
                     bos_token_id=3, eos_token_id=3, **kw)
    return GPT2LMHeadModel(cfg).eval()


def llama(positions=128, **kw):
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=positions,
                      bos_token_id=3, eos_token_id=3, pad_token_id=PAD, **kw)
    return LlamaForCausalLM(cfg).eval()


def bert_cls(positions=40, num_labels=6, **kw):
    cfg = BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                     vocab_size=VOCAB, max_position_embeddings=positions, num_labels=num_labels,
                     pad_token_id=PAD, **kw)
    return BertForSequenceClassification(cfg).eval()


def bert(positions=40):
    cfg = BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                     vocab_size=VOCAB, max_position_embeddings=positions, pad_token_id=PAD)
    return BertModel(cfg).eval()


def roberta_cls(positions=42):
    cfg = RobertaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                        vocab_size=VOCAB, max_position_embeddings=positions, num_labels=3, pad_token_id=PAD,
                        bos_token_id=CLS, eos_token_id=SEP)
    return RobertaForSequenceClassification(cfg).eval()


def distilbert(positions=40):
    cfg = DistilBertConfig(n_layers=2, dim=32, n_heads=4, hidden_dim=64, vocab_size=VOCAB,
                           max_position_embeddings=positions, pad_token_id=PAD)
    return DistilBertModel(cfg).eval()


def tokens(b, t, low=4):
    return torch.randint(low, VOCAB, (b, t))


def lm_step(rmt, ids, weight):
    """One LM forward + backward with ``labels=ids``: (logits, loss, memory grad, ``weight``'s grad)."""
    out = rmt(ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), out.loss.detach(), rmt.memory.grad, weight.grad
