"""Seq2seq RMTs (T5, BART ...ForConditionalGeneration) against the plain restatement of the official
RMTEncoderDecoderForConditionalGeneration loop (rmt_fast/experiments/official.py: official_seq2seq)."""
import pytest
import torch
from transformers import (BartConfig, BartForConditionalGeneration, BartForSequenceClassification, T5Config,
                          T5ForConditionalGeneration, T5Model)

import rmt_fast
from rmt_fast.experiments.official import official_seq2seq
from models import VOCAB, tokens
from checkpointing import grads_with_and_without_checkpointing

ATOL = 2e-5
PAD_T5, EOS_T5 = 0, 1
BOS_BART, PAD_BART, EOS_BART = 0, 1, 2


def t5(dropout=0.0, **kw):
    cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   decoder_start_token_id=PAD_T5, pad_token_id=PAD_T5, eos_token_id=EOS_T5, dropout_rate=dropout,
                   **kw)
    return T5ForConditionalGeneration(cfg).eval()


def bart(dropout=0.0, positions=64, **kw):
    cfg = BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                     max_position_embeddings=positions, dropout=dropout, bos_token_id=BOS_BART,
                     pad_token_id=PAD_BART, eos_token_id=EOS_BART, decoder_start_token_id=EOS_BART,
                     forced_eos_token_id=None, **kw)
    return BartForConditionalGeneration(cfg).eval()


def _official(rmt, ids, **kw):
    c = rmt.rmt_config
    return official_seq2seq(rmt.model, rmt.memory, ids, c.segment_size, c.eos_token_id, c.bos_token_id,
                            c.pad_token_id, **kw)


def _targets(b, n, low=4):
    return torch.randint(low, VOCAB, (b, n))


def test_wrap_detects_seq2seq_and_its_layout():
    r = rmt_fast.wrap(t5(), num_mem_tokens=4)
    c = r.rmt_config
    assert (c.mode, c.bos_token_id, c.eos_token_id, c.pad_token_id) == ("seq2seq", None, EOS_T5, PAD_T5)
    assert c.max_positions == 512 and c.slots_per_segment == 5 and c.segment_size == 512 - 5  # relative positions
    assert c.segment_alignment == "right" and r.adapter.head == "seq2seq"
    r = rmt_fast.wrap(bart(), num_mem_tokens=4)
    c = r.rmt_config
    assert (c.mode, c.bos_token_id, c.eos_token_id, c.pad_token_id) == ("seq2seq", BOS_BART, EOS_BART, PAD_BART)
    assert c.max_positions == 64 and c.slots_per_segment == 6 and c.segment_size == 64 - 6
    with pytest.raises(ValueError, match="segment_size <= 58"):
        rmt_fast.wrap(bart(), num_mem_tokens=4, segment_size=59)


def test_segment_ids_as_official():
    """[BOS] mem tokens [EOS] padding, the memory at 1..m (BART); T5: no BOS, the memory at 0..m-1."""
    for model, bos in ((bart(), [BOS_BART]), (t5(), [])):
        r = rmt_fast.wrap(model, num_mem_tokens=2, segment_size=5)
        s = r.runner.scheme
        content = torch.tensor([[10, 11, 12, 13, 14], [20, 21, 22, 0, 0]])
        params = torch.tensor([[0, 0], [5, 3], [0, 0], [len(bos)] * 2, [1, 1]])
        ids, layout = s.segment_inputs(content, params, 5)
        pad, eos = s.pad, s.eos_token_id
        assert ids[0].tolist() == bos + [pad, pad, 10, 11, 12, 13, 14, eos]
        assert ids[1].tolist() == bos + [pad, pad, 20, 21, 22, eos, pad, pad]
        assert layout.valid_lens.tolist() == [len(bos) + 8, len(bos) + 6] and not layout.causal
        assert s.read_offset == len(bos)


@pytest.mark.parametrize("make", [t5, bart])
@pytest.mark.parametrize("m,s,t,backend", [(3, 6, 17, "reference"), (2, 8, 16, "auto"), (4, 5, 5, "reference"),
                                           (0, 7, 20, "reference")])
def test_matches_official(make, m, s, t, backend):
    model = make()
    rmt = rmt_fast.wrap(model, num_mem_tokens=m, segment_size=s, backend=backend)
    ids, labels = tokens(3, t), _targets(3, 5)
    labels[1, 3:] = -100
    out = rmt(ids, labels=labels)
    ref, ref_mem = _official(rmt, ids, labels=labels)
    torch.testing.assert_close(out.logits, ref.logits, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(out.loss, ref.loss, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(out.memory, ref_mem, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(out.last_hidden_state, ref.encoder_last_hidden_state, atol=ATOL, rtol=1e-4)
    assert out.encoder_attention_mask.bool().all() and out.num_segments == -(-t // s)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in rmt.named_parameters() if p.grad is not None}
    rmt.zero_grad(set_to_none=True)
    _official(rmt, ids, labels=labels)[0].loss.backward()
    assert ("memory" in grads) == (m > 0) and len(grads) > 10
    for n, g in grads.items():
        torch.testing.assert_close(g, dict(rmt.named_parameters())[n].grad, atol=1e-5, rtol=1e-3,
                                   msg=lambda msg: f"{n}: {msg}")


@pytest.mark.parametrize("make", [t5, bart])
def test_decoder_input_ids_and_encoder_only(make):
    model = make()
    rmt = rmt_fast.wrap(model, num_mem_tokens=2, segment_size=7, backend="reference")
    ids, dec = tokens(2, 19), _targets(2, 4)
    out = rmt(ids, decoder_input_ids=dec)
    ref, _ = _official(rmt, ids, decoder_input_ids=dec)
    torch.testing.assert_close(out.logits, ref.logits, atol=ATOL, rtol=1e-4)
    assert out.loss is None
    out = rmt(ids)  # no labels, no decoder inputs: the encoder only
    ref, ref_mem = _official(rmt, ids)
    assert out.logits is None and out.loss is None
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(out.memory, ref_mem, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("make", [t5, bart])
@pytest.mark.parametrize("alignment", ["right", "left"])
def test_variable_length_rows_equal_running_alone(make, alignment):
    model = make()
    rmt = rmt_fast.wrap(model, num_mem_tokens=3, segment_size=6, segment_alignment=alignment, backend="reference")
    ids, labels = tokens(3, 23), _targets(3, 5)
    mask = torch.ones_like(ids)
    mask[0, 17:] = 0  # right padding
    mask[2, :9] = 0  # left padding
    labels[2, 4:] = -100
    dec_mask = (labels != -100).long()
    out = rmt(ids, attention_mask=mask, decoder_input_ids=labels.clamp(min=0), decoder_attention_mask=dec_mask)
    for i in range(3):
        row = ids[i:i + 1, mask[i].bool()]
        alone = rmt(row, decoder_input_ids=labels[i:i + 1].clamp(min=0), decoder_attention_mask=dec_mask[i:i + 1])
        torch.testing.assert_close(out.memory[i:i + 1], alone.memory, atol=ATOL, rtol=1e-4)
        keep = dec_mask[i].bool()
        torch.testing.assert_close(out.logits[i:i + 1, keep], alone.logits[:, keep], atol=ATOL, rtol=1e-4)
        n = int(out.encoder_attention_mask[i].sum())
        assert n == int(alone.encoder_attention_mask.sum())
        torch.testing.assert_close(out.last_hidden_state[i:i + 1, :n], alone.last_hidden_state[:, :n], atol=ATOL,
                                   rtol=1e-4)


@pytest.mark.parametrize("make", [t5, bart])
def test_special_tokens_in_input_are_dropped_like_official(make):
    model = make()
    rmt = rmt_fast.wrap(model, num_mem_tokens=2, segment_size=8, backend="reference")
    c = rmt.rmt_config
    ids, labels = tokens(1, 20), _targets(1, 3)
    specials = [t for t in (c.bos_token_id,) if t is not None]
    with_specials = torch.cat([torch.tensor([specials], dtype=torch.long).view(1, -1), ids,
                               torch.tensor([[c.eos_token_id, c.pad_token_id]])], 1)
    torch.testing.assert_close(rmt(ids, labels=labels).logits, rmt(with_specials, labels=labels).logits)


@pytest.mark.parametrize("make", [t5, bart])
@pytest.mark.parametrize("depth,dropout", [(None, False), (None, True), (0, False), (2, True)])
def test_checkpoint_segments_same_loss_and_gradients(make, depth, dropout):
    model = make(dropout=0.1 if dropout else 0.0)
    ids, labels = tokens(2, 30), _targets(2, 4)
    mask = torch.ones_like(ids)
    mask[0, :8] = 0
    (l0, m0, p0), (l1, m1, p1) = grads_with_and_without_checkpointing(model, ids, labels, mask=mask, seed=5 if dropout else None,
                                        num_mem_tokens=2, segment_size=6, bptt_depth=depth)
    # T5's own SDPA picks another CPU kernel with autograd off (the forward sweep): not bit-identical there
    torch.testing.assert_close(l0, l1, atol=0 if make is bart else 1e-6, rtol=0 if make is bart else 1e-6)
    torch.testing.assert_close(m0, m1, atol=1e-6, rtol=1e-4)
    assert p0.keys() == p1.keys() and len(p0) > 10
    for n in p0:
        torch.testing.assert_close(p0[n], p1[n], atol=1e-6, rtol=1e-4, msg=lambda msg: f"{n}: {msg}")


@pytest.mark.parametrize("make", [t5, bart])
@pytest.mark.parametrize("ckpt", [False, True])
def test_bptt_depth_matches_official_truncation(make, ckpt):
    model = make()
    rmt = rmt_fast.wrap(model, num_mem_tokens=2, segment_size=5, bptt_depth=1, checkpoint_segments=ckpt,
                        backend="reference")
    ids, labels = tokens(2, 24), _targets(2, 4)
    rmt(ids, labels=labels).loss.backward()
    ours = {n: p.grad.clone() for n, p in rmt.named_parameters() if p.grad is not None}
    rmt.zero_grad(set_to_none=True)
    _official(rmt, ids, labels=labels, bptt_depth=1)[0].loss.backward()
    params = dict(rmt.named_parameters())
    for n, g in ours.items():
        ref = params[n].grad if params[n].grad is not None else torch.zeros_like(g)  # cut off: no gradient at all
        torch.testing.assert_close(g, ref, atol=1e-6, rtol=1e-4, msg=lambda msg: f"{n}: {msg}")
    rmt.zero_grad(set_to_none=True)
    _official(rmt, ids, labels=labels)[0].loss.backward()  # full BPTT: the loss reaches the initial memory
    assert rmt.memory.grad.abs().sum() > 0 and ("memory" not in ours or not ours["memory"].any())


@pytest.mark.parametrize("make", [t5, bart])
def test_generate_equals_hf_generate_on_official_encoder_outputs(make):
    from transformers.modeling_outputs import BaseModelOutput

    model = make()
    with torch.no_grad():  # larger weights than the default init, so that greedy decoding varies
        for p in model.parameters():
            p.mul_(8 if p.dim() > 1 else 1)
    rmt = rmt_fast.wrap(model, num_mem_tokens=3, segment_size=6, backend="reference")
    ids = tokens(2, 20)
    with torch.no_grad():
        enc, _ = _official(rmt, ids)

    def hf(**kw):  # a fresh encoder output each time: transformers expands it in place for beams
        return model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=enc.last_hidden_state.clone()),
                              max_new_tokens=6, **kw)

    ours = rmt.generate(ids, max_new_tokens=6, min_new_tokens=6)
    assert ours.shape == (2, 7) and len(set(ours[:, 1:].flatten().tolist())) > 1
    torch.testing.assert_close(ours, hf(min_new_tokens=6))
    torch.testing.assert_close(rmt.generate(ids, max_new_tokens=6, num_beams=3), hf(num_beams=3))
    torch.manual_seed(11)
    sampled = rmt.generate(ids, max_new_tokens=6, do_sample=True, top_k=5)
    torch.manual_seed(11)
    torch.testing.assert_close(sampled, hf(do_sample=True, top_k=5))


def test_generate_rows_of_different_lengths():
    model = bart()
    rmt = rmt_fast.wrap(model, num_mem_tokens=2, segment_size=5, backend="reference")
    ids = tokens(2, 13)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    both = rmt.generate(ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4)
    alone = rmt.generate(ids[1:, 4:], max_new_tokens=4, min_new_tokens=4)
    torch.testing.assert_close(both[1:], alone)


@pytest.mark.parametrize("make", [t5, bart])
def test_hidden_states_and_persistence(make, tmp_path):
    model = make()
    rmt = rmt_fast.wrap(model, num_mem_tokens=2, segment_size=6, backend="reference")
    ids, labels = tokens(2, 15), _targets(2, 3)
    out = rmt(ids, labels=labels, output_hidden_states=True)
    assert len(out.hidden_states) == model.config.num_layers + 1 if make is t5 else 3
    torch.testing.assert_close(out.hidden_states[-1], out.last_hidden_state)
    rmt.save_pretrained(tmp_path)
    again = rmt_fast.from_pretrained(tmp_path)
    assert again.rmt_config == rmt.rmt_config and again.rmt_config.mode == "seq2seq"
    torch.testing.assert_close(again(ids, labels=labels).loss, out.loss)


def test_clear_errors():
    rmt = rmt_fast.wrap(t5(), num_mem_tokens=2, segment_size=6)
    ids = tokens(2, 10)
    for bad in (torch.tensor([1, 2]), _targets(3, 4), _targets(2, 4).float()):
        with pytest.raises(ValueError, match=r"labels must be the target token ids \[B, L\]"):
            rmt(ids, labels=bad)
    with pytest.raises(ValueError, match="decoder_input_ids must be token ids"):
        rmt(ids, decoder_input_ids=_targets(1, 4))
    with pytest.raises(TypeError, match="unexpected arguments"):
        rmt(ids, decoder_inputs_embeds=torch.zeros(2, 3, 32))
    with pytest.raises(ValueError, match="generator"):
        rmt.generate(ids, generator=torch.Generator())
    with pytest.raises(ValueError, match="seq2seq head T5Model is not supported; use ...ForConditionalGeneration"):
        rmt_fast.wrap(T5Model(t5().config), num_mem_tokens=2)
    cfg = bart().config
    cfg.num_labels = 2
    with pytest.raises(ValueError, match="BartForSequenceClassification is not supported"):
        rmt_fast.wrap(BartForSequenceClassification(cfg), num_mem_tokens=2)
    with pytest.raises(ValueError, match="seq2seq mode needs eos_token_id"):
        rmt_fast.wrap(T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=32,
                                                          num_layers=1, num_heads=2, eos_token_id=None)),
                      num_mem_tokens=2)
    with pytest.raises(ValueError, match="mode must be 'auto', 'decoder', 'encoder' or 'seq2seq'"):
        rmt_fast.wrap(t5(), mode="encoder-decoder")


@pytest.mark.parametrize("make", [t5, bart])
def test_num_items_in_batch_sums_the_decoder_token_losses(make):
    """As transformers' Trainer passes it (gradient accumulation; under DDP it scales the loss by the number of
    processes and relies on it): loss = the summed decoder token loss / num_items_in_batch."""
    torch.manual_seed(0)
    rmt = rmt_fast.wrap(make(), num_mem_tokens=2, segment_size=8)
    ids = tokens(2, 20)
    labels = _targets(2, 5)
    labels[1, 3:] = -100
    mean = rmt(ids, labels=labels).loss
    valid = int((labels != -100).sum())
    torch.testing.assert_close(rmt(ids, labels=labels, num_items_in_batch=4 * valid).loss, mean / 4)
    torch.testing.assert_close(rmt(ids, labels=labels, num_items_in_batch=torch.tensor(valid)).loss, mean)
