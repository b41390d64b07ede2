"""wrap(): variable-length rows, BPTT depth, checkpointing, generation, save/load, errors."""
import pytest
import torch

import rmt_fast
from models import CLS, PAD, SEP, bert_cls, gpt2, llama, tokens


def _row_alone(rmt, ids, mask, i, **kw):
    n = int(mask[i].sum())
    return rmt(ids[i:i + 1, :n], **kw)


@pytest.mark.parametrize("make,m,s", [(gpt2, 3, 8), (llama, 2, 6)])
def test_decoder_variable_length_rows_equal_running_alone(make, m, s):
    model = make()
    rmt = rmt_fast.wrap(model, num_mem_tokens=m, segment_size=s)
    lens = [23, 5, 16, 1]
    t = max(lens)
    ids = tokens(len(lens), t)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lens):
        mask[i, :n] = 1
    labels = ids.masked_fill(mask == 0, -100)
    out = rmt(ids, attention_mask=mask, labels=labels)
    losses, counts = [], []
    for i, n in enumerate(lens):
        alone = _row_alone(rmt, ids, mask, i, labels=ids[i:i + 1, :n])
        torch.testing.assert_close(out.logits[i, :n], alone.logits[0], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(out.memory[i], alone.memory[0], atol=2e-5, rtol=1e-4)
        losses.append(alone.loss * (n - 1))
        counts.append(n - 1)
    torch.testing.assert_close(out.loss, sum(losses) / sum(counts), atol=2e-5, rtol=1e-4)


def test_decoder_left_padding_equals_right_padding():
    rmt = rmt_fast.wrap(gpt2(), num_mem_tokens=2, segment_size=5)
    ids = tokens(2, 12)
    right = torch.ones_like(ids)
    right[1, 9:] = 0
    left_ids = ids.clone()
    left_ids[1] = torch.cat([ids[1, 9:], ids[1, :9]])
    left = torch.ones_like(ids)
    left[1, :3] = 0
    a = rmt(ids, attention_mask=right)
    b = rmt(left_ids, attention_mask=left)
    torch.testing.assert_close(a.memory, b.memory, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(a.logits[1, :9], b.logits[1, 3:], atol=2e-5, rtol=1e-4)


def test_encoder_variable_length_rows_equal_running_alone():
    rmt = rmt_fast.wrap(bert_cls(), num_mem_tokens=3, cls_token_id=CLS, sep_token_id=SEP, pad_token_id=PAD)
    s = rmt.rmt_config.segment_size
    lens = [3 * s + 4, s, 7, 2 * s]
    ids = tokens(len(lens), max(lens))
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lens):
        mask[i, :n] = 1
    out = rmt(ids, attention_mask=mask)
    for i, n in enumerate(lens):
        alone = _row_alone(rmt, ids, mask, i)
        torch.testing.assert_close(out.logits[i], alone.logits[0], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(out.memory[i], alone.memory[0], atol=2e-5, rtol=1e-4)


def test_encoder_left_alignment_rows_read_their_own_last_segment():
    rmt = rmt_fast.wrap(bert_cls(), num_mem_tokens=2, cls_token_id=CLS, sep_token_id=SEP, pad_token_id=PAD,
                        segment_alignment="left", segment_size=8)
    lens = [30, 9]
    ids = tokens(2, 30)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lens):
        mask[i, :n] = 1
    out = rmt(ids, attention_mask=mask)
    for i in range(2):
        alone = _row_alone(rmt, ids, mask, i)
        torch.testing.assert_close(out.logits[i], alone.logits[0], atol=2e-5, rtol=1e-4)


def test_bptt_depth_limits_gradient_path():
    model = gpt2(tie_word_embeddings=False)
    s, n_seg = 4, 5
    ids = tokens(1, s * n_seg)
    for depth in (0, 1, 2, None):
        rmt = rmt_fast.wrap(model, num_mem_tokens=2, segment_size=s, bptt_depth=depth)
        out = rmt(ids)
        rmt.memory.grad = None
        out.logits[:, -1].sum().backward()
        # memory parameter reaches the last segment's logits only through all n_seg - 1 handoffs
        reached = rmt.memory.grad is not None and rmt.memory.grad.abs().sum() > 0
        assert reached == (depth is None or depth >= n_seg - 1), depth
    # depth 1: the embeddings of segment n-2 still reach the last logits through one handoff, n-3's do not
    rmt = rmt_fast.wrap(model, num_mem_tokens=2, segment_size=s, bptt_depth=1)
    emb = model.get_input_embeddings()
    emb.weight.grad = None
    out = rmt(ids)
    out.logits[:, -1].sum().backward()
    touched = emb.weight.grad.abs().sum(1) > 0
    assert bool(touched[ids[0, (n_seg - 2) * s:(n_seg - 1) * s]].all())
    only_old = set(ids[0, :(n_seg - 2) * s].tolist()) - set(ids[0, (n_seg - 2) * s:].tolist())
    assert only_old and not any(bool(touched[t]) for t in only_old)


@pytest.mark.parametrize("make,kw", [(gpt2, dict(num_mem_tokens=3, segment_size=6)),
                                     (bert_cls, dict(num_mem_tokens=2, cls_token_id=CLS, sep_token_id=SEP,
                                                     pad_token_id=PAD, segment_size=9))])
def test_checkpoint_segments_same_loss_and_gradients(make, kw):
    model = make(hidden_dropout_prob=0.0) if make is bert_cls else make(resid_pdrop=0.0, embd_pdrop=0.0)
    ids = tokens(2, 40)
    labels = ids if make is gpt2 else torch.tensor([1, 4])
    grads = []
    for ckpt in (False, True):
        rmt = rmt_fast.wrap(model, checkpoint_segments=ckpt, **kw)
        if grads:
            rmt.memory.data.copy_(mem0)
        mem0 = rmt.memory.detach().clone()
        rmt.train()
        model.zero_grad()
        out = rmt(ids, labels=labels)
        out.loss.backward()
        grads.append((out.loss.detach(), rmt.memory.grad.clone(),
                      [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (l0, m0, p0), (l1, m1, p1) = grads
    torch.testing.assert_close(l0, l1)
    torch.testing.assert_close(m0, m1, atol=1e-6, rtol=1e-5)
    assert len(p0) == len(p1) > 0
    for a, b in zip(p0, p1):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_checkpoint_segments_with_dropout_gives_identical_gradients():
    model = gpt2()  # default dropout 0.1
    ids = tokens(2, 30)
    results = []
    for ckpt in (False, True):
        rmt = rmt_fast.wrap(model, num_mem_tokens=2, segment_size=8, checkpoint_segments=ckpt)
        if results:
            rmt.memory.data.copy_(mem0)
        mem0 = rmt.memory.detach().clone()
        rmt.train()
        torch.manual_seed(123)
        out = rmt(ids, labels=ids)
        out.loss.backward()
        results.append((out.loss.detach(), rmt.memory.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-6, rtol=1e-5)


def test_return_logits_false_keeps_loss():
    rmt = rmt_fast.wrap(gpt2(), num_mem_tokens=2, segment_size=8)
    ids = tokens(2, 30)
    a = rmt(ids, labels=ids)
    b = rmt(ids, labels=ids, return_logits=False)
    assert b.logits is None
    torch.testing.assert_close(a.loss, b.loss)


def test_hidden_states_on_request():
    model = gpt2()
    rmt = rmt_fast.wrap(model, num_mem_tokens=2, segment_size=8)
    ids = tokens(2, 20)
    out = rmt(ids, output_hidden_states=True)
    assert len(out.hidden_states) == model.config.n_layer + 1
    assert out.hidden_states[-1].shape == (2, 20, 32)
    torch.testing.assert_close(model.lm_head(out.hidden_states[-1]), out.logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("make,kw", [(gpt2, dict(num_mem_tokens=3, segment_size=6)),
                                     (llama, dict(num_mem_tokens=2, segment_size=6, memory_bidirectional=True)),
                                     (bert_cls, dict(num_mem_tokens=2, cls_token_id=CLS, sep_token_id=SEP,
                                                     pad_token_id=PAD))])
def test_save_load_round_trip(tmp_path, make, kw):
    rmt = rmt_fast.wrap(make(), **kw)
    with torch.no_grad():
        rmt.memory.add_(0.5)  # a trained memory, not the init
    ids = tokens(2, 30)
    before = rmt(ids)
    rmt.save_pretrained(tmp_path / "ckpt")
    loaded = rmt_fast.from_pretrained(str(tmp_path / "ckpt"))
    loaded.eval()
    after = loaded(ids)
    assert loaded.rmt_config == rmt.rmt_config
    torch.testing.assert_close(before.logits, after.logits)
    torch.testing.assert_close(before.memory, after.memory)


def test_memory_init_scale():
    model = gpt2(positions=160)
    rmt = rmt_fast.wrap(model, num_mem_tokens=64, segment_size=8)
    assert rmt.memory.shape == (64, 32)
    emb_std = model.get_input_embeddings().weight.std()
    assert 0.7 < float(rmt.memory.detach().std() / emb_std) < 1.3


def test_default_segment_size():
    assert rmt_fast.wrap(bert_cls(positions=512), num_mem_tokens=10, cls_token_id=CLS,
                         sep_token_id=SEP).rmt_config.segment_size == 499
    assert rmt_fast.wrap(gpt2(positions=64), num_mem_tokens=4).rmt_config.segment_size == 56
    assert rmt_fast.wrap(bert_cls(), num_mem_tokens=2, cls_token_id=CLS, sep_token_id=SEP).rmt_config.\
        segment_alignment == "right"


def test_backend_switch_changes_nothing_on_cpu():
    model = gpt2()
    ids = tokens(2, 20)
    a = rmt_fast.wrap(model, num_mem_tokens=2, segment_size=6, backend="reference")
    b = rmt_fast.wrap(model, num_mem_tokens=2, segment_size=6, backend="auto")
    b.memory.data.copy_(a.memory.data)
    torch.testing.assert_close(a(ids).logits, b(ids).logits)


def test_backbone_usable_outside_rmt():
    model = gpt2()
    ids = tokens(1, 10)
    before = model(ids).logits
    rmt = rmt_fast.wrap(model, num_mem_tokens=2, segment_size=6)
    rmt(ids)
    torch.testing.assert_close(model(ids).logits, before)


# ---- errors ----------------------------------------------------------------------------------------

def test_errors():
    model = gpt2(positions=32)
    with pytest.raises(ValueError, match="segment_size"):
        rmt_fast.wrap(model, num_mem_tokens=2, segment_size=0)
    with pytest.raises(ValueError, match="num_mem_tokens"):
        rmt_fast.wrap(model, num_mem_tokens=-1)
    with pytest.raises(TypeError, match="num_mem_tokens"):
        rmt_fast.wrap(model, num_mem_tokens=2.5)
    with pytest.raises(ValueError, match="positions"):
        rmt_fast.wrap(model, num_mem_tokens=4, segment_size=30)
    with pytest.raises(ValueError, match="backend"):
        rmt_fast.wrap(model, num_mem_tokens=2, backend="fast")
    with pytest.raises(ValueError, match="segment_alignment"):
        rmt_fast.wrap(model, num_mem_tokens=2, segment_alignment="middle")
    with pytest.raises(ValueError, match="mode"):
        rmt_fast.wrap(model, mode="seq2seq")
    with pytest.raises(TypeError, match="model"):
        rmt_fast.wrap(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="cls_token_id"):
        rmt_fast.wrap(bert_cls())
    rmt = rmt_fast.wrap(model, num_mem_tokens=2, segment_size=8)
    with pytest.raises(ValueError, match="empty"):
        rmt(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask shape"):
        rmt(tokens(2, 5), attention_mask=torch.ones(2, 6))
    with pytest.raises(ValueError, match="no tokens"):
        rmt(tokens(2, 5), attention_mask=torch.tensor([[1] * 5, [0] * 5]))
    with pytest.raises(ValueError, match="input_ids"):
        rmt(torch.randn(2, 5))
    with pytest.raises(TypeError, match="input_ids"):
        rmt([1, 2, 3])
    with pytest.raises(ValueError, match="labels"):
        rmt(tokens(2, 5), labels=tokens(2, 4))
    with pytest.raises(ValueError, match="max_new_tokens"):
        rmt.generate(tokens(1, 3), max_new_tokens=-1)


def test_unsupported_model_is_named():
    from transformers import MarianConfig, MarianMTModel

    marian = MarianMTModel(MarianConfig(vocab_size=50, d_model=16, encoder_layers=1, decoder_layers=1,
                                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                        decoder_ffn_dim=32, max_position_embeddings=32, pad_token_id=0,
                                        decoder_start_token_id=0))
    with pytest.raises(ValueError, match="model_type='marian'.*supported"):
        rmt_fast.wrap(marian)
