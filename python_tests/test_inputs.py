"""What forward accepts from tokenizers and Trainer, and the errors for bad ids."""
import pytest
import torch

import rmt_fast
from models import CLS, PAD, SEP, bert_cls, gpt2, tokens


def test_tokenizer_outputs_with_token_type_ids():
    """``rmt(**tokenizer(texts, return_tensors="pt"))`` for a BERT tokenizer: input_ids, token_type_ids (zeros),
    attention_mask."""
    rmt = rmt_fast.wrap(bert_cls(), num_mem_tokens=2, cls_token_id=CLS, sep_token_id=SEP, pad_token_id=PAD)
    ids = torch.cat([torch.full((2, 1), CLS), tokens(2, 30), torch.full((2, 1), SEP)], 1)
    batch = {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "attention_mask": torch.ones_like(ids)}
    torch.testing.assert_close(rmt(**batch).logits, rmt(ids).logits)
    batch["token_type_ids"][:, 10:] = 1
    with pytest.raises(ValueError, match="token_type_ids"):
        rmt(**batch)


def test_num_items_in_batch_sums_the_token_losses():
    """As Trainer passes it under gradient accumulation: loss = summed token loss / num_items_in_batch."""
    rmt = rmt_fast.wrap(gpt2(), num_mem_tokens=2, segment_size=8)
    ids = tokens(2, 20)
    mean = rmt(ids, labels=ids).loss
    total = 2 * 19  # shifted targets
    torch.testing.assert_close(rmt(ids, labels=ids, num_items_in_batch=4 * total).loss, mean / 4)


def test_num_items_in_batch_sums_the_classifier_losses():
    """Sequence classifiers too (Trainer under DDP scales the loss by the number of processes and relies on it)."""
    rmt = rmt_fast.wrap(bert_cls(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), num_mem_tokens=2,
                        segment_size=9, cls_token_id=CLS, sep_token_id=SEP, pad_token_id=PAD)
    ids = tokens(3, 20)
    labels = torch.tensor([0, 4, 2])
    mean = rmt(ids, labels=labels).loss
    torch.testing.assert_close(rmt(ids, labels=labels, num_items_in_batch=torch.tensor(6)).loss, mean / 2)


def test_num_segments_is_an_attribute_not_a_field():
    rmt = rmt_fast.wrap(gpt2(), num_mem_tokens=2, segment_size=8)
    out = rmt(tokens(1, 20))
    assert out.num_segments == 3
    assert "num_segments" not in out.keys() and all(isinstance(v, torch.Tensor) for v in out.to_tuple())


@pytest.mark.parametrize("bad", [-1, 97, 1000])
def test_ids_outside_the_vocabulary_are_named(bad):
    rmt = rmt_fast.wrap(gpt2(), num_mem_tokens=2, segment_size=8)
    ids = tokens(2, 20)
    ids[1, 5] = bad
    with pytest.raises(ValueError, match="input_ids"):
        rmt(ids)
    mask = torch.ones_like(ids)
    mask[1, 5] = 0  # a masked-out position may hold anything
    rmt(ids, attention_mask=mask)


def test_unexpected_arguments_are_named():
    rmt = rmt_fast.wrap(gpt2(), num_mem_tokens=2, segment_size=8)
    with pytest.raises(TypeError, match="pixel_values"):
        rmt(tokens(1, 10), pixel_values=torch.zeros(1))
