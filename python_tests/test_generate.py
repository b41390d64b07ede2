"""generate(): transformers' conventions (padding kept, eos/pad from generation_config, max_length,
GenerationConfig, repetition penalty, argument checks) on top of the streaming segment decoder."""
import pytest
import torch
from transformers import (GenerationConfig, LogitsProcessorList, RepetitionPenaltyLogitsProcessor,
                          TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

import rmt_fast
from models import gpt2, llama, tokens

NO_EOS = dict(eos_token_id=[])  # an empty eos list: decode every step (the tiny models' eos is token 3)


def _padded(lens, side):
    """A batch of rows with ``lens`` tokens, padded on ``side`` with token 0."""
    t = max(lens)
    ids, mask = torch.zeros(len(lens), t, dtype=torch.long), torch.zeros(len(lens), t, dtype=torch.long)
    for i, n in enumerate(lens):
        cols = slice(t - n, t) if side == "left" else slice(0, n)
        ids[i, cols], mask[i, cols] = tokens(1, n)[0], 1
    return ids, mask


def _content(ids, mask, i):
    return ids[i][mask[i].bool()][None]


def _slow(rmt, seq, steps, processors=None, generator=None):
    """Reference decoding: the full forward over prompt + generated at every step (one row, no padding)."""
    with torch.no_grad():
        for _ in range(steps):
            logits = rmt(seq).logits[:, -1].float()
            if processors is None:
                nxt = logits.argmax(-1)
            else:
                logits = processors(seq, logits)
                nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0] if generator else \
                    logits.argmax(-1)
            seq = torch.cat([seq, nxt[:, None]], 1)
    return seq


@pytest.mark.parametrize("make,m,s,bidir", [(gpt2, 2, 5, False), (llama, 3, 4, False), (gpt2, 2, 5, True)])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_keeps_prompt_and_equals_rows_alone_and_full_forward(make, m, s, bidir, side):
    rmt = rmt_fast.wrap(make(), num_mem_tokens=m, segment_size=s, memory_bidirectional=bidir)
    lens = [13, 7, 1, 10, 7]
    ids, mask = _padded(lens, side)
    t, steps = ids.shape[1], 9
    out = rmt.generate(ids, attention_mask=mask, max_new_tokens=steps, **NO_EOS)
    assert out.shape == (len(lens), t + steps)
    assert torch.equal(out[:, :t], ids)  # the prompt block as given: padding stays where it was
    for i in range(len(lens)):
        row = _content(ids, mask, i)
        alone = rmt.generate(row, max_new_tokens=steps, **NO_EOS)
        assert torch.equal(out[i, t:], alone[0, lens[i]:]), i
        assert torch.equal(alone, _slow(rmt, row, steps)), i
    # greedy = argmax of the full forward over the padded batch extended by the new tokens
    full_mask = torch.cat([mask, torch.ones(len(lens), steps, dtype=mask.dtype)], 1)
    if side == "left":
        with torch.no_grad():
            logits = rmt(out, attention_mask=full_mask).logits
        assert torch.equal(logits[:, t - 1:-1].argmax(-1), out[:, t:])


def test_eos_from_generation_config_int_or_list_then_pad():
    model = gpt2()
    rmt = rmt_fast.wrap(model, num_mem_tokens=2, segment_size=5)
    ids, mask = _padded([8, 5], "left")
    free = rmt.generate(ids, attention_mask=mask, max_new_tokens=6, **NO_EOS)
    a, b = int(free[0, 8]), int(free[1, 8])  # each row's first new token
    assert a not in free[1, 8:].tolist() and b not in free[0, 8:].tolist()
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = a, 0
    out = rmt.generate(ids, attention_mask=mask, max_new_tokens=6)
    assert torch.equal(out[:, :8], ids) and out.shape == (2, 14)
    assert int(out[0, 8]) == a and bool((out[0, 9:] == 0).all())  # pad after eos
    assert torch.equal(out[1], free[1])  # the other row goes on
    model.generation_config.eos_token_id = [96, a, b]
    out = rmt.generate(ids, attention_mask=mask, max_new_tokens=6)
    assert out.shape == (2, 9) and out[:, 8].tolist() == [a, b]  # stops when every row finished
    # without a pad id, finished rows are filled with the (first) eos token, as transformers does
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = [a, 96], None
    out = rmt.generate(ids, attention_mask=mask, max_new_tokens=6)
    assert out[0, 8:].tolist() == [a] * 6 and torch.equal(out[1], free[1])
    # explicit arguments override the model's generation_config
    assert torch.equal(rmt.generate(ids, attention_mask=mask, max_new_tokens=6, **NO_EOS), free)
    out = rmt.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=b, pad_token_id=1)
    assert torch.equal(out[0], free[0]) and out[1, 8:].tolist() == [b] + [1] * 5


def test_max_length_and_generation_config():
    rmt = rmt_fast.wrap(llama(), num_mem_tokens=2, segment_size=6)
    ids, mask = _padded([9, 4], "left")
    a = rmt.generate(ids, attention_mask=mask, max_new_tokens=5, **NO_EOS)
    assert torch.equal(rmt.generate(ids, attention_mask=mask, max_length=14, **NO_EOS), a)
    assert torch.equal(rmt.generate(ids, GenerationConfig(max_new_tokens=5), attention_mask=mask, **NO_EOS), a)
    assert torch.equal(rmt.generate(ids, GenerationConfig(max_length=14), attention_mask=mask, **NO_EOS), a)
    assert rmt.generate(ids, attention_mask=mask, **NO_EOS).shape[1] == 9 + 20  # default: 20 new tokens
    assert rmt.generate(ids, attention_mask=mask, max_length=9).shape[1] == 9
    # sampling settings from a GenerationConfig equal the same explicit arguments
    gc = GenerationConfig(max_new_tokens=7, do_sample=True, temperature=0.7, top_k=9, top_p=0.8,
                          repetition_penalty=1.3, eos_token_id=5, pad_token_id=0)
    explicit = dict(max_new_tokens=7, do_sample=True, temperature=0.7, top_k=9, top_p=0.8, repetition_penalty=1.3,
                    eos_token_id=5, pad_token_id=0)
    x = rmt.generate(ids, gc, attention_mask=mask, generator=torch.Generator().manual_seed(3))
    y = rmt.generate(ids, attention_mask=mask, generator=torch.Generator().manual_seed(3), **explicit)
    assert torch.equal(x, y)
    # an explicit argument wins over the GenerationConfig
    z = rmt.generate(ids, gc, attention_mask=mask, do_sample=False, max_new_tokens=3, eos_token_id=[])
    assert torch.equal(z, rmt.generate(ids, attention_mask=mask, max_new_tokens=3, repetition_penalty=1.3,
                                       **NO_EOS))


def test_backbone_generation_config_and_transformers_defaults():
    model = llama()
    rmt = rmt_fast.wrap(model, num_mem_tokens=2, segment_size=6)
    ids = tokens(2, 9)

    def sample(**kw):
        return rmt.generate(ids, generator=torch.Generator().manual_seed(5), **NO_EOS, **kw)

    # sampling without top_k uses transformers' default top_k=50
    assert torch.equal(sample(max_new_tokens=6, do_sample=True), sample(max_new_tokens=6, do_sample=True, top_k=50))
    assert not torch.equal(sample(max_new_tokens=6, do_sample=True), sample(max_new_tokens=6, do_sample=True,
                                                                             top_k=0))
    gc = model.generation_config
    gc.do_sample, gc.temperature, gc.top_p, gc.max_new_tokens = True, 0.6, 0.8, 6
    assert torch.equal(sample(), sample(max_new_tokens=6, do_sample=True, temperature=0.6, top_p=0.8))
    assert sample().shape == (2, 15)
    gc.num_beams = 4
    with pytest.raises(ValueError, match="num_beams"):
        sample()
    assert sample(generation_config=GenerationConfig(num_beams=1)).shape == (2, 15)


def test_repetition_penalty_and_sampling_follow_transformers_processors():
    rmt = rmt_fast.wrap(gpt2(), num_mem_tokens=2, segment_size=5)
    row = tokens(1, 7)
    row[0, :3] = torch.tensor([10, 11, 10])
    steps = 10
    for penalty in (1.8, 0.6):
        out = rmt.generate(row, max_new_tokens=steps, repetition_penalty=penalty, **NO_EOS)
        ref = _slow(rmt, row, steps, LogitsProcessorList([RepetitionPenaltyLogitsProcessor(penalty)]))
        assert torch.equal(out, ref), penalty
    assert not torch.equal(rmt.generate(row, max_new_tokens=steps, repetition_penalty=1.8, **NO_EOS),
                           rmt.generate(row, max_new_tokens=steps, **NO_EOS))
    procs = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.4), TemperatureLogitsWarper(0.8),
                                 TopKLogitsWarper(12), TopPLogitsWarper(0.9)])
    out = rmt.generate(row, max_new_tokens=steps, do_sample=True, repetition_penalty=1.4, temperature=0.8,
                       top_k=12, top_p=0.9, generator=torch.Generator().manual_seed(7), **NO_EOS)
    ref = _slow(rmt, row, steps, procs, torch.Generator().manual_seed(7))
    assert torch.equal(out, ref)


def test_sampling_is_reproducible_per_generator():
    rmt = rmt_fast.wrap(gpt2(), num_mem_tokens=2, segment_size=5)
    ids, mask = _padded([8, 6], "left")
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=5, top_p=0.9, **NO_EOS)
    s1 = rmt.generate(ids, generator=torch.Generator().manual_seed(0), **kw)
    s2 = rmt.generate(ids, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(s1, s2) and s1.shape == (2, 14) and torch.equal(s1[:, :8], ids)


@pytest.mark.parametrize("kw,name", [
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k"), (dict(top_k=2.5), "top_k"),
    (dict(temperature=0.0), "temperature"), (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"), (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(max_new_tokens=-1), "max_new_tokens"), (dict(max_new_tokens=1.5), "max_new_tokens"),
    (dict(max_length=2), "max_length"), (dict(max_length=5, max_new_tokens=2), "max_new_tokens or max_length"),
    (dict(eos_token_id="x"), "eos_token_id"), (dict(eos_token_id=[3, -1]), "eos_token_id"),
    (dict(pad_token_id=-2), "pad_token_id"), (dict(do_sample="yes"), "do_sample"),
    (dict(generation_config=GenerationConfig(num_beams=2)), "num_beams"),
    (dict(generation_config=GenerationConfig(top_p=0.0)), "top_p"),
])
def test_invalid_arguments_are_named(kw, name):
    rmt = rmt_fast.wrap(gpt2(), num_mem_tokens=2, segment_size=5)
    with pytest.raises(ValueError, match=name):
        rmt.generate(tokens(1, 4), **kw)


def test_wrong_types_are_named():
    rmt = rmt_fast.wrap(gpt2(), num_mem_tokens=2, segment_size=5)
    with pytest.raises(TypeError, match="generation_config"):
        rmt.generate(tokens(1, 4), dict(max_new_tokens=2))
    with pytest.raises(TypeError, match="generator"):
        rmt.generate(tokens(1, 4), generator=0)
